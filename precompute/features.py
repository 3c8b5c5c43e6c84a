"""`vlmerge precompute`: DINOv2 features of every image -> one HDF5 store, sharded and resumable."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlmerge.precompute import store
from vlmerge.precompute.encoder import PUBLIC_WIDTHS, PooledEncoder, crop_size, declared_width, load_encoder
from vlmerge.precompute.manifests import ImageItem, read_image_source, unique_images
from vlmerge import code_version, layout
from vlmerge.config import Config, FeaturesConfig, NpyImport, save_resolved
from vlmerge.device import resolve_device
from vlmerge.errors import VlmergeError
from vlmerge.io import check_writable, fingerprint, remove_stale_temps, write_jsonl
from vlmerge.problems import ProblemLog


def shard_path(cfg: Config, index: int, count: int) -> Path:
    return layout.store_shard(cfg.store_path, index, count)


def import_shard_path(cfg: Config, imp: NpyImport) -> Path:
    return layout.store_import_shard(cfg.store_path, imp.prefix)


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index` of `count`: contiguous, sizes differing by at most one."""
    return n * index // count, n * (index + 1) // count


def aligned_batches(pending: np.ndarray, n: int, batch_size: int) -> list[np.ndarray]:
    """The pending rows of each fixed block [k*B, (k+1)*B); empty blocks are dropped.

    Fixed blocks make a resumed run form exactly the batches an uninterrupted run would have
    formed for the same rows, so its features are bitwise the same.
    """
    out = []
    for start in range(0, n, batch_size):
        rows = np.flatnonzero(pending[start : start + batch_size]) + start
        if len(rows):
            out.append(rows)
    return out


def load_rgb(path: Path | None, max_pixels: int) -> Image.Image:
    """Decode an image fully; the error says 'missing image', 'oversized image' (its header declares more
    than `max_pixels`) or 'corrupt image', and why."""
    if path is None or not path.is_file():
        raise ValueError(f"missing image: {path}")
    try:
        with Image.open(path) as im:
            width, height = im.size  # from the header: nothing is decoded before `convert`
            if width * height <= max_pixels:
                return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad files; all mean the same here
        raise ValueError(f"corrupt image: {path} ({type(e).__name__}: {e})") from None
    raise ValueError(f"oversized image: {path} declares {width}×{height} pixels, more than "
                     f"features.max_image_pixels ({max_pixels})")


class ImageBatches(Dataset):
    """Item k is batch k: (rows that loaded, pixel values, [(row, error), ...])."""

    def __init__(self, items: list[ImageItem], batches: list[np.ndarray], processor, max_pixels: int):
        self.items, self.batches, self.processor, self.max_pixels = items, batches, processor, max_pixels

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        ok, images, failed = [], [], []
        for row in self.batches[k]:
            try:
                images.append(load_rgb(self.items[row].path, self.max_pixels))
                ok.append(row)
            except ValueError as e:
                failed.append((int(row), str(e)))
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        return np.array(ok, dtype=np.int64), pixels, failed


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the encoder


@dataclasses.dataclass
class Runtime:
    """The encoder placed on its device, and how to feed it."""

    encoder: PooledEncoder
    processor: object
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def create(cls, fc: FeaturesConfig) -> Runtime:
        device = resolve_device(fc.device, "features.device")
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fc.precision]
        if device.type == "cpu" and dtype == torch.float16:
            raise VlmergeError("features.precision: fp16 needs a GPU; use fp32 or bf16 on the CPU")
        encoder, processor = load_encoder(fc.encoder, fc.layer, fc.pooling, fc.revision, fc.grid)
        return cls(encoder.to(device=device, dtype=dtype), processor, device, dtype)

    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        return self.encoder(pixels).float().cpu().numpy()

    def null_feature(self) -> np.ndarray:
        """The feature of an all-black image (the input of text-only examples), of the store's row shape."""
        size = crop_size(self.processor)
        black = Image.new("RGB", (size, size))
        return self.encode(self.processor(images=[black], return_tensors="pt")["pixel_values"])[0]


@dataclasses.dataclass
class ShardResult:
    images: int
    encoded: int = 0
    already_done: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def line(self, label: str) -> str:
        kinds = ProblemLog([(i, e) for i, e in self.failures]).kinds()
        why = f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})" if kinds else ""
        rate = self.encoded / self.seconds if self.seconds else 0.0
        return (
            f"{label}: {self.images} images: {self.encoded} encoded, {self.already_done} already done, "
            f"{len(self.failures)} failed{why} in {self.seconds:.1f}s ({rate:.1f} images/s)"
        )


def store_attrs(cfg: Config, ids_fp: str, rt: Runtime) -> dict:
    fc = cfg.features
    # A grid enters the fingerprint only when there is one: stores of single vectors keep theirs.
    grid = [fc.grid] if fc.grid > 1 else []
    return {
        "encoder": fc.encoder,
        "encoder_revision": fc.revision or "",
        "layer": fc.layer,
        "pooling": fc.pooling,
        "grid": fc.grid,
        "image_size": crop_size(rt.processor),
        "dtype": fc.dtype,
        "code_version": code_version(),
        "fingerprint": fingerprint([cfg.layout.relative(fc.encoder), fc.revision, fc.layer, fc.pooling, fc.dtype,
                                    ids_fp, *grid]),
    }


def _open_shard(path: Path, ids: list[str], row_shape: tuple[int, ...], attrs: dict) -> store.Shard:
    """Open the shard at `path`, creating it if absent; refuse one made from other inputs."""
    if not path.exists():
        store.create_shard(path, ids, row_shape, attrs["dtype"], attrs)
    shard = store.Shard(path)
    if shard.attr("fingerprint") != attrs["fingerprint"]:
        shard.file.close()
        raise VlmergeError(
            f"{path}: shard was made from other manifests or encoder settings; delete it to recompute"
        )
    return shard


def run_shard(
    cfg: Config, rt: Runtime, items: list[ImageItem], index: int, count: int, attrs: dict,
    *, retry_failures: bool = False, progress: bool = True,
) -> ShardResult:
    """Encode the not-yet-done images of one shard; resumable at any point."""
    start, stop = shard_bounds(len(items), index, count)
    mine = items[start:stop]
    path = shard_path(cfg, index, count)
    result = ShardResult(images=len(mine))
    t0 = time.perf_counter()
    with _open_shard(path, [it.image_id for it in mine], rt.encoder.row_shape, attrs) as shard:
        done = shard.done()
        result.already_done = int(done.sum())
        if shard.complete and not retry_failures:
            result.failures = shard.failures()
            return result
        batches = aligned_batches(~done, len(mine), cfg.features.batch_size)
        loader = DataLoader(
            ImageBatches(mine, batches, rt.processor, cfg.features.max_image_pixels),
            batch_size=None,
            num_workers=cfg.features.num_workers,
            pin_memory=rt.device.type == "cuda",
            worker_init_fn=_worker_init,
            prefetch_factor=4 if cfg.features.num_workers else None,
        )
        failed: list[tuple[str, str]] = []
        bar = tqdm(total=int((~done).sum()), unit="img", desc=f"shard {index + 1}/{count}",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        with bar:
            for rows, pixels, errors in loader:
                failed += [(mine[r].image_id, e) for r, e in errors]
                if pixels is not None:
                    shard.write(rows, rt.encode(pixels))
                    result.encoded += len(rows)
                bar.update(len(rows) + len(errors))
        shard.finish(failed)
        result.failures = failed
    result.seconds = time.perf_counter() - t0
    return result


def gather_images(cfg: Config) -> tuple[list[ImageItem], ProblemLog]:
    """Every unique image of the configured manifests, in manifest order."""
    problems = ProblemLog()
    items: list[ImageItem] = []
    for src in cfg.features.images:
        items += read_image_source(src, problems)
    return unique_images(items, problems), problems


@dataclasses.dataclass
class Release:
    """An import's captions and row-aligned `.npy` parts (memory-mapped), checked against each other."""

    imp: NpyImport
    captions: list[str]
    parts: list[np.ndarray]

    @property
    def ids(self) -> list[str]:
        return [f"{self.imp.prefix}-{i:08d}" for i in range(len(self.captions))]


def read_release(imp: NpyImport, dim: int, where: str = "features.imports") -> Release:
    """Read an import's caption JSON and open its `.npy` parts; one line for anything that does not fit:
    vectors whose width is not that of the encoder the import declares, or not the store's."""
    try:
        captions = json.loads(Path(imp.captions).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmergeError(f"{imp.captions}: caption JSON not found") from None
    except json.JSONDecodeError as e:
        raise VlmergeError(f"{imp.captions}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise VlmergeError(f"{imp.captions}: not UTF-8 text (byte {e.start}); expected a caption JSON") from None
    if not isinstance(captions, list):
        raise VlmergeError(f"{imp.captions}: expected a JSON list of captions aligned with the .npy rows")
    captions = [c.get("caption", "") if isinstance(c, dict) else str(c) for c in captions]
    parts = []
    for p in imp.npy:
        if not Path(p).is_file():
            raise VlmergeError(f"{p}: .npy features not found")
        try:
            parts.append(np.load(p, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as e:
            raise VlmergeError(f"{p}: not a readable .npy array ({e})") from None
        width, declared = parts[-1].shape[-1], declared_width(imp.encoder)
        if parts[-1].ndim == 2 and declared is not None and width != declared:
            known = [name for name, w in PUBLIC_WIDTHS.items() if w == width]
            raise VlmergeError(f"{p}: vectors are {width}-d but {where}.encoder {imp.encoder} makes {declared}-d ones"
                               + (f" ({known[0]} makes {width}-d)" if known else "")
                               + ": declare the encoder that made them")
        if parts[-1].ndim != 2 or parts[-1].shape[1] != dim:
            raise VlmergeError(f"{p}: expected features of shape [N, {dim}] (the encoder's hidden size), "
                               f"got {list(parts[-1].shape)}")
    rows = sum(len(a) for a in parts)
    if rows != len(captions):
        raise VlmergeError(f"{imp.captions}: {len(captions)} captions but the .npy parts hold {rows} rows")
    return Release(imp, captions, parts)


def import_npy(cfg: Config, release: Release, dim: int, attrs: dict) -> list[str]:
    """Precomputed release features -> a complete shard; also writes `<prefix>.captions.jsonl`."""
    imp, ids = release.imp, release.ids
    write_jsonl(cfg.layout.import_captions(imp.prefix),
                ({"image_id": i, "caption": c} for i, c in zip(ids, release.captions, strict=True)))
    path = import_shard_path(cfg, imp)
    if path.exists():
        with store.Shard(path) as s:
            if s.complete and s.attr("fingerprint") == attrs["fingerprint"]:
                return ids
        path.unlink()
    store.create_shard(path, ids, (dim,), attrs["dtype"], attrs)  # release vectors: one per image, never a grid
    with store.Shard(path) as s:
        offset = 0
        for part in release.parts:
            for a in range(0, len(part), store.COPY_ROWS):
                block = np.asarray(part[a : a + store.COPY_ROWS])
                s.write(np.arange(offset + a, offset + a + len(block)), block)
            offset += len(part)
        s.finish([])
    return ids


def precompute(
    cfg: Config, *, shard: int | None = None, num_shards: int | None = None, link_only: bool = False,
    retry_failures: bool = False, progress: bool = True,
) -> Path | None:
    """Run one shard (`shard`: an array task's, `vlmerge.launch.array_shard`), or all shards then link.

    Returns the store's path once linked, None after a single shard.
    """
    fc = cfg.features
    count = num_shards or fc.num_shards
    index = shard
    if index is not None and not 0 <= index < count:
        raise VlmergeError(f"--shard {index}: expected 0..{count - 1} (num_shards={count})")
    check_writable(cfg.root)
    out = cfg.store_path
    # What earlier tasks left when killed mid-write (the temp files of tasks still running stay).
    remove_stale_temps(cfg.layout.features_dir, layout.store_shard_dir(out))
    items, problems = gather_images(cfg)
    problems.report("manifests")
    if not items and not fc.imports:
        raise VlmergeError("features.images: the manifests list no images")
    source = provenance(fc, has_images=bool(items))
    rt = Runtime.create(fc)
    rel = cfg.layout.relative
    imports = [i.model_dump() | {"captions": rel(i.captions), "npy": [rel(p) for p in i.npy],
                                 "null_feature": rel(i.null_feature)} for i in fc.imports]
    ids_fp = fingerprint([[it.image_id for it in items], imports])
    attrs = store_attrs(cfg, ids_fp, rt) | dict(zip(("encoder", "layer", "pooling"), source))
    if out.exists():
        try:
            with h5py.File(out, "r") as f:
                same, n = f.attrs.get("fingerprint") == attrs["fingerprint"], f.attrs.get("num_images")
        except OSError:
            raise VlmergeError(f"{out}: not a readable feature store (truncated?); remove it to build it again") \
                from None
        if not same:
            raise VlmergeError(f"{out}: exists and was made from other inputs; remove it or set features.name")
        _finish_link(cfg, out)
        print(f"precompute: {out} is complete ({n} images); nothing to do")
        return out

    # Inputs checked before anything is written: a bad import fails here, not after the shards.
    releases = ([read_release(imp, rt.encoder.dim, f"features.imports[{k}]") for k, imp in enumerate(fc.imports)]
                if index is None else [])
    null = null_feature(fc, rt) if index is None else None
    indices = [index] if index is not None else ([] if link_only else range(count))
    for i in indices:
        result = run_shard(cfg, rt, items, i, count, attrs, retry_failures=retry_failures, progress=progress)
        print(result.line(f"precompute shard {i + 1}/{count}"))
        ProblemLog(list(result.failures)).report(f"shard {i + 1}/{count}")
    if index is not None:
        return None

    expected = [it.image_id for it in items]
    shards = [shard_path(cfg, i, count) for i in range(count)]
    for release in releases:
        expected += import_npy(cfg, release, rt.encoder.dim, attrs)
        shards.append(import_shard_path(cfg, release.imp))
    n, n_failed = store.link(shards, out, expected, null, attrs)
    _finish_link(cfg, out)
    print(f"precompute: {out}: {n} images, {n_failed} failed")
    return out


def _finish_link(cfg: Config, out: Path) -> None:
    """The steps after the store's rename (a run killed between them leaves them to the next)."""
    shutil.rmtree(layout.store_shard_dir(out), ignore_errors=True)
    if not layout.store_config(out).is_file():
        save_resolved(cfg, layout.store_config(out))


def provenance(fc: FeaturesConfig, *, has_images: bool) -> tuple[str, int, str]:
    """(encoder, layer, pooling) of every vector of the store; one line when sources disagree."""
    local = (fc.encoder, fc.layer, fc.pooling)
    sources = ([("features.encoder/layer/pooling", local)] if has_images else []) + [
        (f"features.imports[{k}] ({imp.prefix})", (imp.encoder, imp.layer, imp.pooling))
        for k, imp in enumerate(fc.imports)]
    (first_name, first), *rest = sources
    for name, p in rest:
        if p != first:
            raise VlmergeError(f"{name}: vectors of {p[0]} layer {p[1]} {p[2]}, but {first_name} are of "
                               f"{first[0]} layer {first[1]} {first[2]}; one store holds vectors of one encoder "
                               "(use another features.name)")
    for k, imp in enumerate(fc.imports):
        if imp.null_feature == "black" and first != local:
            raise VlmergeError(
                f"features.imports[{k}].null_feature: the import's vectors come from {imp.encoder} layer {imp.layer} "
                f"{imp.pooling}, not the local {fc.encoder} layer {fc.layer} {fc.pooling}; give the release's "
                "black-image row as a .npy file of shape [D]")
    return first


def null_feature(fc: FeaturesConfig, rt: Runtime) -> np.ndarray:
    """The black image's feature: the file an import declares, else the local encoder's."""
    rows = []
    for k, imp in enumerate(fc.imports):
        if imp.null_feature == "black":
            continue
        try:
            row = np.load(imp.null_feature, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VlmergeError(f"{imp.null_feature}: features.imports[{k}].null_feature: expected a .npy file "
                               f"({e})") from None
        if row.reshape(-1).shape != (rt.encoder.dim,):
            raise VlmergeError(f"{imp.null_feature}: expected the black image's feature of shape [{rt.encoder.dim}], "
                               f"got {list(row.shape)}")
        rows.append(row.reshape(-1).astype(np.float32))
    if any(not np.array_equal(r, rows[0]) for r in rows[1:]):
        raise VlmergeError("features.imports: the imports declare different black-image rows; one store has one")
    return rows[0] if rows else rt.null_feature()
