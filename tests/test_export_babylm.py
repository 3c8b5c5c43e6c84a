"""`vlmerge export-babylm`: a run's checkpoints as BabyLM's `chck_<n>M` revisions, and the collation check."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, Dinov2Config, LlamaConfig, LlamaForCausalLM

from vlmerge.cli import main
from vlmerge.config import load_config
from vlmerge.errors import VlmergeError
from vlmerge.evaluate import babylm_submission as sub
from vlmerge.hf import quiet_transformers
from vlmerge.io import write_json
from vlmerge.layout import (babylm_export_source, babylm_revision, babylm_revision_words, checkpoint_dir,
                            list_checkpoints, statistics_file)
from vlmerge.model import PooledLlavaConfig, export_text, init_model

M = 1_000_000


# --- revision names -------------------------------------------------------------------------------

def test_revision_names_on_hand_values():
    assert babylm_revision(999_999) is None
    assert babylm_revision(1_000_000) == "chck_1M"
    assert babylm_revision(int(1e9)) == "chck_1000M" and babylm_revision(1e9) == "chck_1000M"
    assert babylm_revision(10 * M) == "chck_10M" and babylm_revision(20 * M) == "chck_20M"
    assert babylm_revision(100 * M) == "chck_100M" and babylm_revision(300 * M) == "chck_300M"
    for words in (0, 11 * M, 15 * M, 150 * M, 1_100 * M, 2_000 * M, 1_000_001, 1.5e6):
        assert babylm_revision(words) is None, words
    assert babylm_revision_words("chck_7M") == 7 * M and babylm_revision_words("chck_1000M") == 10**9
    for name in ("main", "chck_11M", "chck_07M", "chck_7", "chck_2000M"):
        assert babylm_revision_words(name) is None, name


def test_revision_lists_are_the_pipelines():
    # collate_preds.py lines 16-17, written out as the pipeline writes them
    strict_small = [f"chck_{i}M" for i in range(1, 10)] + [f"chck_{i * 10}M" for i in range(1, 11)]
    other = ([f"chck_{i}M" for i in range(1, 10)] + [f"chck_{i * 10}M" for i in range(1, 10)]
             + [f"chck_{i * 100}M" for i in range(1, 11)])
    assert sub.fast_revisions("strict-small") == strict_small
    for track in ("strict", "multimodal", "interaction"):
        assert sub.fast_revisions(track) == other
    assert [babylm_revision(babylm_revision_words(r)) for r in other] == other
    with pytest.raises(VlmergeError, match="track 'small'"):
        sub.fast_revisions("small")


# --- export ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One checkpoint folder in our multimodal format (what `write_checkpoint` leaves), tiny."""
    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    config = PooledLlavaConfig(vision_config=Dinov2Config(hidden_size=8, num_hidden_layers=0), text_config=text,
                               image_token_index=63, image_seq_length=1, vision_feature_select_strategy="default")
    folder = tmp_path_factory.mktemp("template")
    with quiet_transformers():
        init_model(config, seed=0).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    for statistic in ("grams", "fisher"):
        statistics_file(folder, statistic).write_bytes(b"not part of the model")
    return folder


def make_run(root: Path, template: Path, words: list[int], run: str = "text") -> Path:
    run_dir = load_config(None, [f"paths.root={root}"]).layout.run_dir(run)
    for w in words:
        ckpt = checkpoint_dir(run_dir, w)
        shutil.copytree(template, ckpt)
        write_json(ckpt / "trainer_state.json", {"run": run, "words_seen": w})
    return run_dir


@pytest.fixture
def run_dir(tmp_path, tiny_checkpoint) -> Path:
    return make_run(tmp_path / "root", tiny_checkpoint, [500_000, M, 2 * M, 2_500_000])


def visible(out: Path) -> list[str]:
    """Every entry of an export folder, temp names included."""
    return sorted(p.name for p in out.iterdir())


def test_export_writes_each_revision_and_main_as_a_model_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    s = sub.export_command(run_dir, out)
    assert s.written == ["chck_1M", "chck_2M", "main"] and s.kept == []
    assert [c.name for c in s.skipped] == ["words-000000500000", "words-000002500000"]
    assert visible(out) == ["chck_1M", "chck_2M", "main"]
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "3 revision(s) written" in line and "main = words-000002500000" in line
    assert "skipped (at no revision's words): words-000000500000, words-000002500000" in line
    ckpts = {c.name: c for c in list_checkpoints(run_dir)}
    for revision, words in (("chck_1M", M), ("chck_2M", 2 * M), ("main", 2_500_000)):
        folder, ckpt = out / revision, checkpoint_dir(run_dir, words)
        assert json.loads((folder / "trainer_state.json").read_text())["words_seen"] == words
        assert json.loads(babylm_export_source(folder).read_text()) == {
            "experiment": "demo", "run": "text", "words": words, "text_only": False}
        assert not any(statistics_file(folder, s).exists() for s in ("grams", "fisher"))
        assert (folder / "tokenizer_config.json").is_file()
        # the weights are the checkpoint's own file (a hard link on one file system), the rest copies
        assert os.stat(folder / "model.safetensors").st_ino == os.stat(ckpt / "model.safetensors").st_ino
        assert os.stat(folder / "config.json").st_ino != os.stat(ckpt / "config.json").st_ino
    assert len(ckpts) == 4
    with quiet_transformers():
        model = AutoModelForImageTextToText.from_pretrained(out / "chck_1M")
    ref = load_file(checkpoint_dir(run_dir, M) / "model.safetensors")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k in ref)


def test_rerun_skips_complete_revisions_and_refuses_a_different_source(run_dir, tmp_path, tiny_checkpoint):
    out = tmp_path / "export"
    sub.export_run(run_dir, out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = sub.export_run(run_dir, out)
    assert again.written == [] and again.kept == ["chck_1M", "chck_2M", "main"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    # the run went on: main is no longer its last checkpoint, and is never replaced silently
    make_run(tmp_path / "root", tiny_checkpoint, [3 * M])
    with pytest.raises(VlmergeError, match=r"main: already exported from .*'words': 2500000.*remove it"):
        sub.export_run(run_dir, out)
    assert sub.export_run(run_dir, tmp_path / "later").written == ["chck_1M", "chck_2M", "chck_3M", "main"]


def test_a_failure_midway_leaves_no_partial_revision(run_dir, tmp_path, monkeypatch):
    out, calls = tmp_path / "export", []
    real = sub._link_or_copy

    def failing(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 8:  # inside chck_2M, some of its files already written
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(sub, "_link_or_copy", failing)
    with pytest.raises(OSError):
        sub.export_run(run_dir, out)
    assert visible(out) == ["chck_1M"]  # complete, and no temp folder of chck_2M
    monkeypatch.setattr(sub, "_link_or_copy", real)
    s = sub.export_run(run_dir, out)
    assert s.written == ["chck_2M", "main"] and s.kept == ["chck_1M"]


def test_weights_are_copied_where_no_link_can_be_made(run_dir, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "export"
    sub.export_run(run_dir, out)
    copy, ckpt = out / "chck_1M" / "model.safetensors", checkpoint_dir(run_dir, M) / "model.safetensors"
    assert os.stat(copy).st_ino != os.stat(ckpt).st_ino and copy.read_bytes() == ckpt.read_bytes()


def test_text_only_writes_export_texts_llama(run_dir, tmp_path):
    out = tmp_path / "export"
    assert sub.export_run(run_dir, out, text_only=True).written == ["chck_1M", "chck_2M", "main"]
    assert visible(out) == ["chck_1M", "chck_2M", "main"]
    config = json.loads((out / "chck_2M" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads(babylm_export_source(out / "chck_2M").read_text())["text_only"] is True
    ref = export_text(checkpoint_dir(run_dir, 2 * M), tmp_path / "ref")
    got, want = load_file(out / "chck_2M" / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with quiet_transformers():
        LlamaForCausalLM.from_pretrained(out / "main")
    with pytest.raises(VlmergeError, match="text_only"):  # the other format into the same folder
        sub.export_run(run_dir, out)


def test_cli_exports_and_a_run_without_a_revision_is_one_line(tmp_path, tiny_checkpoint, capsys):
    root = tmp_path / "root"
    make_run(root, tiny_checkpoint, [M, 1_500_000])
    assert main(["export-babylm", "--run", "text", "--out", str(tmp_path / "ok"), f"paths.root={root}"]) == 0
    assert visible(tmp_path / "ok") == ["chck_1M", "main"]
    make_run(root, tiny_checkpoint, [1_000, 2_000], run="multimodal")
    capsys.readouterr()
    code = main(["export-babylm", "--run", "multimodal", "--out", str(tmp_path / "no"), f"paths.root={root}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "no checkpoint at a BabyLM revision's words" in err
    assert "2 checkpoint(s) run from 1,000 to 2,000 words" in err
    assert not (tmp_path / "no").exists()
    assert main(["export-babylm", "--out", str(tmp_path / "x"), f"paths.root={root}"]) == 2
    assert main(["export-babylm", "--check", str(tmp_path)]) == 2  # --track is required
    assert "needs --track" in capsys.readouterr().err


# --- the collation check --------------------------------------------------------------------------

def predictions(sizes, subtasks=None) -> dict:
    """A predictions.json as the pipeline writes it: per subtask, its predictions."""
    names = list(sizes) if isinstance(sizes, dict) else subtasks or ["only"]
    return {k: {"predictions": [{"id": f"{k}_{i}", "pred": ""} for i in range(
        sizes[k] if isinstance(sizes, dict) else sizes)]} for k in names}


def results_tree(model_dir: Path, track: str) -> Path:
    """A complete results/<model> for `track`: every file collate_preds.py --fast reads, at its sizes."""
    revisions = sub.fast_revisions(track)
    for revision in ["main", *revisions]:
        for e in sub.expected_files(track, revision):
            path = model_dir / revision / e.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if e.kind == "devbench":
                np.save(path, np.zeros(e.sizes, dtype=np.float32))
            elif e.kind == "aoa":
                path.write_text(json.dumps({"results": [{"step": r, "word": "a"} for r in revisions
                                                        for _ in range(sub.AOA_SIZE)]}))
            else:
                blimp = list(sub.BLIMP_SIZES) if "blimp_fast" in str(e.path) else None
                path.write_text(json.dumps(predictions(e.sizes, blimp)))
    return model_dir


@pytest.fixture(scope="module")
def strict_small(tmp_path_factory) -> Path:
    return results_tree(tmp_path_factory.mktemp("results") / "model", "strict-small")


def test_the_check_passes_a_complete_tree(strict_small, capsys):
    rows = sub.check_results(strict_small, "strict-small")
    assert len(rows) == 16 + 19 * 7 and not [r for r in rows if r.problem]
    assert main(["export-babylm", "--check", str(strict_small), "--track", "strict-small"]) == 0
    out = capsys.readouterr().out
    assert "chck_100M" in out and "all 149 file(s) of the strict-small track present" in out


def test_the_check_names_a_missing_file_and_a_wrong_count(strict_small, tmp_path, capsys):
    tree = shutil.copytree(strict_small, tmp_path / "model")
    (tree / "chck_3M/zero_shot/causal/ewok/ewok_fast/predictions.json").unlink()
    blimp = tree / "chck_5M/zero_shot/causal/blimp/blimp_fast/predictions.json"
    data = json.loads(blimp.read_text())
    data["wh_island"]["predictions"].pop()
    blimp.write_text(json.dumps(data))
    rte = tree / "main/finetune/rte/predictions.json"
    rte.write_text(json.dumps(predictions(138)))
    bad = {(r.revision, str(r.path)): r.problem for r in sub.check_results(tree, "strict-small") if r.problem}
    assert bad == {("chck_3M", "zero_shot/causal/ewok/ewok_fast/predictions.json"): "missing",
                   ("chck_5M", "zero_shot/causal/blimp/blimp_fast/predictions.json"):
                       "wh_island: 199 items, expected 200",
                   ("main", "finetune/rte/predictions.json"): "only: 138 items, expected 139"}
    code = main(["export-babylm", "--check", str(tree), "--track", "strict-small"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1
    assert "3 of 149 file(s) missing or wrong" in err and "chck_3M/zero_shot/causal/ewok/ewok_fast" in err
    table = out.splitlines()
    assert any(l.split() == ["chck_3M", "7", "6", "1", "0"] for l in table), out
    assert any("chck_5M" in l and "wh_island: 199 items, expected 200" in l for l in table)


def test_the_check_of_named_subtasks_and_of_the_track(strict_small, tmp_path):
    tree = shutil.copytree(strict_small, tmp_path / "model")
    et = tree / "main/zero_shot/causal/entity_tracking/entity_tracking/predictions.json"
    data = json.loads(et.read_text())
    del data["ambiref_5_ops"]
    data["Extra_Ops"] = {"predictions": []}
    et.write_text(json.dumps(data))
    (problem,) = [r.problem for r in sub.check_results(tree, "strict-small") if r.problem]
    assert problem == "extra_ops: unexpected subtask; ambiref_5_ops: missing subtask"
    # the strict track wants the revisions to 1000M, and the AoA rows of each
    bad = {r.revision: r.problem for r in sub.check_results(strict_small, "strict") if r.problem}
    assert set(bad) == {"main", *[f"chck_{n}M" for n in range(200, 1001, 100)]}
    assert bad["chck_200M"] == "missing" and bad["main"].startswith("chck_200M: no rows")


def test_the_multimodal_track_checks_vqa_winoground_and_devbench(tmp_path):
    tree = results_tree(tmp_path / "model", "multimodal")
    assert not [r for r in sub.check_results(tree, "multimodal") if r.problem]
    np.save(tree / "main/zero_shot/devbench/gram-trog.npy", np.zeros((75, 4, 1), dtype=np.int64))
    (tree / "main/zero_shot/causal/vqa/vqa_filtered/predictions.json").unlink()
    bad = {str(r.path): r.problem for r in sub.check_results(tree, "multimodal") if r.problem}
    assert bad == {"zero_shot/devbench/gram-trog.npy":
                   "shape (75, 4, 1), expected (76, 4, 1); dtype int64, expected floats",
                   "zero_shot/causal/vqa/vqa_filtered/predictions.json": "missing"}
    # the strict track reads none of them
    assert not [r for r in sub.check_results(tree, "strict") if r.problem]
