import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, Dinov2Model

from vlmerge.launch import array_shard
from vlmerge.precompute import encoder as encoder_mod
from vlmerge.precompute.encoder import blocks_needed, pool
from vlmerge.precompute.features import aligned_batches, precompute, shard_bounds, shard_path
from vlmerge.precompute.store import read_store
from vlmerge.cli import main
from vlmerge.demo.world import save_random_dinov2
from vlmerge.errors import VlmergeError


def manifest_rows(*manifests: Path) -> list[dict]:
    rows = []
    for m in manifests:
        for line in m.read_text().splitlines():
            row = json.loads(line)
            rows.append({**row, "path": str(m.parent / row["path"])})
    return rows


def reference_features(encoder_dir: Path, paths: list[str], layer: int = -2) -> np.ndarray:
    """Straight from transformers: full forward, hidden_states[layer], CLS dropped, mean over patches."""
    model = Dinov2Model.from_pretrained(encoder_dir).eval()
    processor = AutoImageProcessor.from_pretrained(encoder_dir)
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), 256):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + 256]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            hidden = model(pixels, output_hidden_states=True).hidden_states[layer]
            out.append(hidden[:, 1:].mean(dim=1).numpy())
    return np.concatenate(out)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_store_equals_a_direct_dinov2_forward_for_every_demo_image(make_cfg, demo_world):
    cfg = make_cfg()
    out = precompute(cfg, progress=False)
    ids, feats, null = read_store(out)
    rows = manifest_rows(demo_world.root / "captions.jsonl", demo_world.root / "eval" / "images.jsonl")
    assert ids == [r["image_id"] for r in rows]
    ref = reference_features(Path(cfg.features.encoder), [r["path"] for r in rows])
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=0)

    black = Image.new("RGB", (56, 56))
    processor = AutoImageProcessor.from_pretrained(cfg.features.encoder)
    model = Dinov2Model.from_pretrained(cfg.features.encoder).eval()
    with torch.no_grad():
        hidden = model(processor(images=[black], return_tensors="pt")["pixel_values"], output_hidden_states=True)
    np.testing.assert_allclose(null, hidden.hidden_states[-2][0, 1:].mean(0).numpy(), atol=1e-5, rtol=0)

    with h5py.File(out) as f:
        assert f["done"][:].all() and len(f["failures/image_id"]) == 0
        assert f["features"].chunks is not None
        for key in ("encoder", "encoder_revision", "layer", "pooling", "image_size", "dtype", "code_version"):
            assert key in f.attrs
        assert f.attrs["layer"] == -2 and f.attrs["pooling"] == "mean_patch" and f.attrs["image_size"] == 56
    assert out.with_suffix(".config.yaml").is_file()
    assert not (out.parent / "demo.shards").exists()

    # A rerun finds the store complete and does nothing.
    mtime = out.stat().st_mtime_ns
    assert precompute(cfg, progress=False) == out and out.stat().st_mtime_ns == mtime


@pytest.fixture
def slow_encoder(tmp_path) -> Path:
    """A random DINOv2 big enough that a run lasts long enough to be killed midway."""
    return save_random_dinov2(tmp_path / "encoder", 1, hidden_size=192, num_hidden_layers=6, mlp_ratio=4,
                              image_size=112)


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, demo_world, slow_encoder, monkeypatch):
    rows = manifest_rows(demo_world.root / "captions.jsonl")[:600]
    manifest = write_manifest(tmp_path / "subset.jsonl", rows)
    common = [f"features.encoder={slow_encoder}", f"features.images=[{{manifest: '{manifest}'}}]",
              "features.batch_size=4", "features.num_workers=0", "features.name=kill"]

    killed_root = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmerge", "precompute", "--quiet", f"paths.root={killed_root}", *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    from vlmerge.config import load_config

    cfg_killed = load_config(None, [f"paths.root={killed_root}", *common])
    shard = shard_path(cfg_killed, 0, 1)
    done_at_kill = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists():
            with h5py.File(shard, "r", locking=False) as f:
                n_done = int(f["done"][:].sum())
            if n_done >= 40:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run ended before it could be killed: {proc.stderr.read()}"
    with h5py.File(shard, "r") as f:  # the killed shard still opens
        done_at_kill = int(f["done"][:].sum())
    assert 40 <= done_at_kill < len(rows)
    assert not cfg_killed.store_path.exists()

    encoded = []
    original = encoder_mod.PooledEncoder.forward
    monkeypatch.setattr(encoder_mod.PooledEncoder, "forward",
                        lambda self, px: encoded.append(len(px)) or original(self, px))
    resumed = precompute(cfg_killed, progress=False)
    # Only the rows not yet done were encoded (+1 for the black image's feature).
    assert sum(encoded) == len(rows) - done_at_kill + 1

    fresh = precompute(load_config(None, [f"paths.root={tmp_path / 'fresh'}", *common]), progress=False)
    a, b = read_store(resumed), read_store(fresh)
    assert a[0] == b[0] == [r["image_id"] for r in rows]
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_corrupt_missing_and_oversized_images_are_recorded_and_counted(tmp_path, demo_world, make_cfg, capsys):
    rows = manifest_rows(demo_world.root / "captions.jsonl")[:20]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    huge = tmp_path / "huge.png"  # a few kB that declare 4 Mpx (a hostile file declares 144 Mpx in 140 kB)
    Image.new("L", (2000, 2000)).save(huge)
    rows[3] = {**rows[3], "path": str(corrupt)}
    rows[7] = {**rows[7], "path": str(tmp_path / "gone.png")}
    rows[9] = {**rows[9], "path": str(huge)}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    cfg_args = [f"paths.root={tmp_path / 'out'}", f"features.images=[{{manifest: '{manifest}'}}]",
                f"features.encoder={demo_world.encoder_dir}", "features.name=bad", "features.num_workers=0",
                "features.max_image_pixels=1000000"]
    assert main(["precompute", "--quiet", *cfg_args]) == 0
    out, err = capsys.readouterr()
    assert "3 failed (" in out and all(f"1 {kind} image" in out for kind in ("corrupt", "missing", "oversized"))
    assert "m.jsonl:21: malformed line" in err
    with h5py.File(tmp_path / "out" / "features" / "bad.h5") as f:
        failed = dict(zip(f["failures/image_id"].asstr()[:], f["failures/error"].asstr()[:]))
        assert len(f["image_ids"]) == 17
    assert failed[rows[3]["image_id"]].startswith("corrupt image:")
    assert failed[rows[7]["image_id"]].startswith("missing image:")
    assert failed[rows[9]["image_id"]] == (f"oversized image: {huge} declares 2000×2000 pixels, more than "
                                          "features.max_image_pixels (1000000)")


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "override, message",
    [
        ("features.images=[{manifest: /nonexistent/manifest.jsonl}]", "/nonexistent/manifest.jsonl: manifest not found"),
        ("features.poolng=cls", "unknown key 'features.poolng'"),
        ("features.encoder=/nonexistent/enc", "features.encoder: /nonexistent/enc: no such directory"),
    ],
)
def test_bad_input_exits_nonzero_in_one_line_and_leaves_outputs(make_cfg, capsys, override, message):
    cfg = make_cfg()
    precompute(cfg, progress=False)
    before = _snapshot(cfg.root / "features")
    code = main(["precompute", "--quiet", f"paths.root={cfg.root}", "features.name=other", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0]
    assert _snapshot(cfg.root / "features") == before


def test_unwritable_output_root_exits_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("existing output")
    assert main(["precompute", "--quiet", f"paths.root={blocker / 'root'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output root is not writable" in err[0]
    assert blocker.read_text() == "existing output"


def test_shards_in_any_order_then_link_equal_a_single_run(make_cfg):
    single = read_store(precompute(make_cfg("features.name=single"), progress=False))
    cfg = make_cfg("features.name=sharded", "features.num_shards=3")
    with pytest.raises(VlmergeError, match="shard missing"):
        precompute(cfg, link_only=True, progress=False)
    assert precompute(cfg, shard=2, progress=False) is None
    array_task = array_shard(3, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert precompute(cfg, shard=array_task, progress=False) is None
    with pytest.raises(VlmergeError, match="SLURM array has 2 tasks but features.num_shards is 3"):
        array_shard(3, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"})
    precompute(cfg, shard=1, progress=False)
    ids, feats, null = read_store(precompute(cfg, link_only=True, progress=False))
    assert ids == single[0] and len(set(ids)) == len(ids)
    np.testing.assert_allclose(feats, single[1], atol=1e-6)
    np.testing.assert_array_equal(null, single[2])


def _release(tmp_path: Path, n_rows: tuple[int, ...] = (5, 3), dim: int = 64) -> tuple[list[np.ndarray], str]:
    """A BabyLM-release-like import (caption JSON + .npy parts); returns the parts and its fields."""
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, dim)).astype(np.float32) for n in n_rows]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"part{i}.npy", p)
    (tmp_path / "captions.json").write_text(json.dumps([f"caption number {i} ." for i in range(sum(n_rows))]))
    npy = ", ".join(f"'{tmp_path / f'part{i}.npy'}'" for i in range(len(parts)))
    return parts, f"captions: '{tmp_path / 'captions.json'}', npy: [{npy}], prefix: cc"


def test_import_of_release_npy_features(make_cfg, tmp_path):
    parts, fields = _release(tmp_path)
    local = make_cfg().features
    imports = f"features.imports=[{{{fields}, encoder: '{local.encoder}', layer: -2, pooling: mean_patch}}]"
    cfg = make_cfg("features.name=imp", imports)
    ids, feats, _ = read_store(precompute(cfg, progress=False))
    imported = [i for i in ids if i.startswith("cc-")]
    assert imported == [f"cc-{i:08d}" for i in range(8)]
    np.testing.assert_array_equal(feats[-8:], np.concatenate(parts))
    lines = (cfg.root / "features" / "cc.captions.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines][2] == {"image_id": "cc-00000002", "caption": "caption number 2 ."}

    captions = json.loads((tmp_path / "captions.json").read_text())
    (tmp_path / "captions.json").write_text(json.dumps(captions[:7]))
    with pytest.raises(VlmergeError, match="7 captions but the .npy parts hold 8 rows"):
        precompute(make_cfg("features.name=imp2", imports), progress=False)


def test_an_import_from_another_encoder_brings_its_own_black_image_row(make_cfg, tmp_path):
    parts, fields = _release(tmp_path)
    other = f"{fields}, encoder: some-lab/encoder-64, layer: -1, pooling: cls"
    # Its vectors are not the local encoder's: the local black image would be a wrong null feature...
    with pytest.raises(VlmergeError, match=r"imports\[0\].null_feature: the import's vectors come from "
                                           "some-lab/encoder-64 layer -1 cls, not the local"):
        precompute(make_cfg("features.name=rel", "features.images=[]", f"features.imports=[{{{other}}}]"),
                   progress=False)
    # ...and the store cannot mix them with locally encoded images.
    black = np.full(64, 0.25, dtype=np.float32)
    np.save(tmp_path / "black.npy", black)
    declared = f"features.imports=[{{{other}, null_feature: '{tmp_path / 'black.npy'}'}}]"
    with pytest.raises(VlmergeError, match="one store holds vectors of one encoder"):
        precompute(make_cfg("features.name=mixed", declared), progress=False)
    store = precompute(make_cfg("features.name=rel", "features.images=[]", declared), progress=False)
    ids, feats, null = read_store(store)
    np.testing.assert_array_equal(feats, np.concatenate(parts))
    np.testing.assert_array_equal(null, black.astype(null.dtype))
    with h5py.File(store) as f:  # stamped with the provenance the user declared, not the local encoder's
        assert (f.attrs["encoder"], int(f.attrs["layer"]), f.attrs["pooling"]) == ("some-lab/encoder-64", -1, "cls")


def test_an_import_refuses_vectors_of_another_width_than_its_declared_encoders(make_cfg, tmp_path):
    # The BabyLM release's vectors are DINOv2-base's, 768-d: declared as dinov2-large's they are refused...
    from vlmerge.demo.world import save_random_dinov2

    _, fields = _release(tmp_path, dim=768)
    np.save(tmp_path / "black.npy", np.zeros(768, dtype=np.float32))
    base = f"{fields}, layer: -2, pooling: mean_patch, null_feature: '{tmp_path / 'black.npy'}'"
    large = make_cfg("features.name=osf", "features.images=[]",
                     f"features.imports=[{{{base}, encoder: facebook/dinov2-large}}]")
    with pytest.raises(VlmergeError, match=r"part0.npy: vectors are 768-d but features.imports\[0\].encoder "
                                           r"facebook/dinov2-large makes 1024-d ones \(facebook/dinov2-base makes "
                                           r"768-d\): declare the encoder that made them"):
        precompute(large, progress=False)
    # ...and accepted as dinov2-base's (in a store of 768-d features: the local encoder's width)
    encoder = save_random_dinov2(tmp_path / "enc768", 0, hidden_size=768, num_hidden_layers=1, num_attention_heads=4)
    true = make_cfg("features.name=osf", "features.images=[]", f"features.encoder={encoder}",
                    f"features.imports=[{{{base}, encoder: facebook/dinov2-base}}]")
    ids, feats, _ = read_store(precompute(true, progress=False))
    assert feats.shape == (8, 768) and ids[0] == "cc-00000000"


def test_shard_bounds_cover_every_row_once():
    for n in (0, 1, 7, 100):
        for count in (1, 3, 8):
            spans = [shard_bounds(n, i, count) for i in range(count)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_aligned_batches_keep_fixed_blocks():
    pending = np.array([1, 1, 0, 1, 0, 0, 0, 0, 1, 1], dtype=bool)
    assert [b.tolist() for b in aligned_batches(pending, 10, 4)] == [[0, 1, 3], [8, 9]]


def test_pool_and_layer_arithmetic():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    assert pool(h, "cls").tolist() == [[0, 1], [6, 7]]
    assert pool(h, "mean_patch").tolist() == [[3, 4], [9, 10]]
    assert pool(h, "mean_all").tolist() == [[2, 3], [8, 9]]
    assert blocks_needed(-2, 24) == 23 and blocks_needed(-1, 24) == 24 and blocks_needed(0, 24) == 0
    with pytest.raises(VlmergeError, match="out of range"):
        blocks_needed(-26, 24)


def test_babylm_layout_caption_json_beside_an_image_folder(make_cfg, demo_world, tmp_path):
    rows = manifest_rows(demo_world.root / "captions.jsonl")[:6]
    records = [{"file_name": Path(r["path"]).name, "caption": r["caption"]} for r in rows[:4]]
    records.append({"caption": "no file named"})
    (tmp_path / "captions.json").write_text(json.dumps(records))
    cfg = make_cfg("features.name=babylm", f"features.images=[{{manifest: '{tmp_path / 'captions.json'}', "
                   f"format: babylm, images_dir: '{demo_world.images_dir}'}}]")
    ids, feats, _ = read_store(precompute(cfg, progress=False))
    assert ids == [Path(r["path"]).stem for r in rows[:4]]
    single = read_store(precompute(make_cfg("features.name=ref"), progress=False))
    np.testing.assert_allclose(feats, single[1][:4], atol=1e-6)
