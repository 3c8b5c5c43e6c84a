"""Streaming access to Hugging Face safetensors directories: read one tensor at a time, write
a safetensors file tensor by tensor, so that memory stays about the largest tensor."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vlmerge.errors import VlmergeError
from vlmerge.hf import read_model_config
from vlmerge.io import file_sha256

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class ModelDir:
    """A Hugging Face model directory with safetensors weights (one file or an index of shards)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            self.files = sorted({self.path / f for f in weight_map.values()})
        elif (self.path / SINGLE).is_file():
            self.files = [self.path / SINGLE]
        else:
            raise VlmergeError(f"{self.path}: no {SINGLE} or {INDEX} (a Hugging Face safetensors directory)")
        if not (self.path / "config.json").is_file():
            raise VlmergeError(f"{self.path}: no config.json")
        self.config = read_model_config(self.path / "config.json")
        self._where: dict[str, Path] = {}
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in self.files:
            try:
                with safe_open(f, framework="pt") as st:
                    for name in st.keys():
                        sl = st.get_slice(name)
                        self._where[name] = f
                        self.specs[name] = (_torch_dtype(sl.get_dtype()), tuple(sl.get_shape()))
            except (SafetensorError, OSError) as e:  # truncated, garbage, unreadable
                raise VlmergeError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
        self._handles = {f: safe_open(f, framework="pt") for f in self.files}
        self._spans: dict[Path, dict[str, tuple[int, int]]] = {}

    @property
    def architecture(self) -> str:
        return self.config.get("model_type", "?") + "/" + ",".join(self.config.get("architectures") or [])

    def names(self) -> list[str]:
        return list(self.specs)

    def get(self, name: str) -> torch.Tensor:
        """One tensor (memory-mapped by safetensors, copied out on use), checked for NaN/Inf."""
        t = self._handles[self._where[name]].get_tensor(name)
        # A finite sum proves every entry finite at a fraction of isfinite's cost; only an
        # overflowing (or truly non-finite) sum needs the entry-by-entry check.
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise VlmergeError(f"{self.path}: tensor {name!r} holds NaN or Inf")
        return t

    def span(self, name: str) -> tuple[Path, int, int]:
        """The file holding a tensor and the byte range [start, end) of its data in that file."""
        f = self._where[name]
        if f not in self._spans:
            self._spans[f] = data_spans(f)
        return (f, *self._spans[f][name])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.specs:
            yield name, self.get(name)

    def sha256(self) -> str:
        """sha256 of the weights file (for a sharded model: of its shards' hashes)."""
        hashes = [file_sha256(f) for f in self.files]
        return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()


def data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Every tensor's byte range [start, end) in a safetensors file, read from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _torch_dtype(code: str) -> torch.dtype:
    for dtype, c in DTYPES.items():
        if c == code:
            return dtype
    raise VlmergeError(f"unsupported safetensors dtype {code}")


def check_compatible(a: ModelDir, b: ModelDir, *, what: str = "inputs") -> None:
    """Same architecture, tensor names, shapes and dtypes; else one line naming the first difference."""
    if a.architecture != b.architecture:
        raise VlmergeError(f"{what} differ in architecture: {a.path} is {a.architecture}, {b.path} is {b.architecture}")
    for name in a.specs.keys() | b.specs.keys():
        if name not in a.specs or name not in b.specs:
            missing, has = (a, b) if name not in a.specs else (b, a)
            first = next(n for n in has.names() if n not in missing.specs)
            raise VlmergeError(f"{what} differ in tensors: {first!r} is in {has.path} but not in {missing.path}")
    for name in a.names():
        (da, sa), (db, sb) = a.specs[name], b.specs[name]
        if sa != sb:
            raise VlmergeError(f"{what} differ at tensor {name!r}: shape {list(sa)} in {a.path}, {list(sb)} in {b.path}")
        if da != db:
            raise VlmergeError(f"{what} differ at tensor {name!r}: dtype {da} in {a.path}, {db} in {b.path}")


class SafetensorsWriter:
    """Writes a safetensors file whose tensors (names, dtypes, shapes) are known up front.

    Every tensor has its place in the file from the start, so tensors are written with
    positional writes: in any order, and from several threads at once (the writes, and the
    kernel-side copies of `copy`, release the GIL).
    """

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, (dtype, shape) in specs.items():
            size = dtype.itemsize * numel(shape)
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        start = 8 + len(blob)
        self.specs = specs
        self._spans = {name: (start + header[name]["data_offsets"][0], start + header[name]["data_offsets"][1])
                       for name in specs}
        self._written: set[str] = set()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        _pwrite(self._fd, memoryview(struct.pack("<Q", len(blob)) + blob), 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[name]
        t = tensor.detach().to("cpu", dtype).contiguous()
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{name}: shape {tuple(t.shape)} != {shape}")
        _pwrite(self._fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), self._spans[name][0])
        self._written.add(name)

    def copy(self, name: str, source: tuple[Path, int, int]) -> None:
        """Copy a tensor's bytes from a range of another file (same dtype and shape), kernel-side."""
        path, begin, end = source
        start, stop = self._spans[name]
        if end - begin != stop - start:
            raise RuntimeError(f"{name}: {end - begin} bytes in {path}, {stop - start} expected")
        with open(path, "rb") as src:
            while begin < end:
                n = _copy_range(src.fileno(), self._fd, end - begin, begin, start)
                if n == 0:
                    raise RuntimeError(f"{path}: ends before the data of {name}")
                begin, start = begin + n, start + n
        self._written.add(name)

    def close(self) -> None:
        """Close the finished file; an error if a tensor was never written."""
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            raise RuntimeError(f"only {len(self._written)} of {len(self.specs)} tensors written, not {missing[0]}")
        self.release()

    def release(self) -> None:
        """Close the file descriptor, finished or not (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# copy_file_range's answers where the kernel cannot copy between these two files (another file system,
# one that does not support it): the bytes then go through memory.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_COPY_BLOCK = 1 << 24  # bytes per read when copying through memory


def _copy_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    """Copy up to `count` bytes between file offsets, kernel-side where it can; return the bytes copied."""
    try:
        return os.copy_file_range(src, dst, count, src_offset, dst_offset)
    except OSError as e:
        if e.errno not in _NO_KERNEL_COPY:
            raise
    data = os.pread(src, min(count, _COPY_BLOCK), src_offset)
    _pwrite(dst, memoryview(data), dst_offset)
    return len(data)


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    # A write may be short (signals, very large sizes): write the rest.
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def numel(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of this shape (without building one)."""
    n = 1
    for s in shape:
        n *= s
    return n
