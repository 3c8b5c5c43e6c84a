"""Image and caption manifests: JSONL {image_id, path, caption}, the BabyLM release layout, and DevBench's
manifests (whose images the `devbench_*` tasks score)."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlmerge.config import ImageSource
from vlmerge.errors import VlmergeError
from vlmerge.problems import ProblemLog, read_jsonl


@dataclasses.dataclass(frozen=True)
class ImageItem:
    image_id: str
    path: Path | None
    caption: str | None


def expand_paths(patterns: Iterable[str], key: str) -> list[Path]:
    """Files named by paths or glob patterns, in order; a pattern that matches nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not Path(matches[0]).is_file():
            raise VlmergeError(f"{key}: {pattern}: no such file")
        out.extend(Path(m) for m in matches)
    return out


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise VlmergeError(f"{path}: {what} not found")


def read_jsonl_manifest(path: Path, problems: ProblemLog, *, need_path: bool = True) -> list[ImageItem]:
    """A JSONL manifest; relative image paths are relative to the manifest's folder."""
    items = []
    for where, obj in read_jsonl(path, problems, "manifest"):
        image_id, rel, caption = obj.get("image_id"), obj.get("path"), obj.get("caption")
        if not isinstance(image_id, str) or not image_id:
            problems.add(where, "malformed line: 'image_id' must be a non-empty string")
            continue
        if need_path and not isinstance(rel, str):
            problems.add(where, "malformed line: 'path' must be a string")
            continue
        if caption is not None and not isinstance(caption, str):
            problems.add(where, "malformed line: 'caption' must be a string")
            continue
        items.append(ImageItem(image_id, path.parent / rel if isinstance(rel, str) else None, caption))
    return items


_FILE_KEYS = ("file_name", "image", "image_path", "filename")


def read_babylm_captions(path: Path, images_dir: Path, problems: ProblemLog) -> list[ImageItem]:
    """A BabyLM-style caption JSON beside an image folder.

    Accepted: a list of objects with an image file name (one of `file_name`, `image`,
    `image_path`, `filename`), a `caption`, and optionally an `image_id` (default: the file's
    stem); or an object mapping image file names to captions.
    """
    _require_file(path, "caption JSON")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VlmergeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise VlmergeError(f"{path}: not UTF-8 text (byte {e.start}); expected a caption JSON") from None
    if isinstance(data, dict):
        data = [{"file_name": k, "caption": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise VlmergeError(f"{path}: expected a list of caption records or a {{file: caption}} object")
    items = []
    for i, rec in enumerate(data):
        where = f"{path}[{i}]"
        name = next((rec[k] for k in _FILE_KEYS if isinstance(rec, dict) and k in rec), None)
        if not isinstance(name, str):
            problems.add(where, f"malformed record: expected one of {', '.join(_FILE_KEYS)}")
            continue
        caption = rec.get("caption")
        image_id = rec.get("image_id") or Path(name).stem
        items.append(ImageItem(str(image_id), images_dir / name, caption if isinstance(caption, str) else None))
    return items


# DevBench (BabyLM's evaluation_data/full_eval/devbench): task -> its folder under assets/ and evals/
DEVBENCH_FOLDERS = {"vv": "lex-viz_vocab", "trog": "gram-trog", "things": "sem-things"}


def devbench_records(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    """("file:line", row) of a DevBench CSV (a byte-order mark is dropped: sem-things' manifest has one)."""
    if not path.is_file():
        raise VlmergeError(f"{path}: DevBench {what} not found (expected the folder of BabyLM's "
                           "devbench/download_data.sh, evaluation_data/full_eval/devbench)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def devbench_image_columns(row: dict) -> list[str]:
    """`image1`, `image2`, … of a DevBench CSV row, in order."""
    return sorted((c for c in row if c and re.fullmatch(r"image[0-9]+", c)), key=lambda c: int(c[5:]))


def devbench_manifest(root: Path, task: str, problems: ProblemLog) -> tuple[list[tuple[int, str, tuple[str, ...]]], int]:
    """([(row from 1, text1, image ids)], rows) of a task's manifest; a malformed row is a problem, its
    number kept. An image's id is its path under `root`: `assets/<task folder>/<manifest path>`."""
    folder, out, n = DEVBENCH_FOLDERS[task], [], 0
    for n, (where, row) in enumerate(devbench_records(root / "assets" / folder / "manifest.csv", "manifest"), 1):
        values = [row.get("text1"), *(row[c] for c in devbench_image_columns(row))]
        if len(values) < 2 or not all(isinstance(v, str) and v.strip() for v in values):
            problems.add(where, "malformed line: expected non-empty text1 and image1, image2, …")
            continue
        out.append((n, values[0], tuple(f"assets/{folder}/{Path(v).as_posix()}" for v in values[1:])))
    return out, n


def read_devbench_images(root: Path, problems: ProblemLog) -> list[ImageItem]:
    """Every image of the DevBench tasks whose manifest is under `root`, once each."""
    ids = {i: None for task, folder in DEVBENCH_FOLDERS.items() if (root / "assets" / folder / "manifest.csv").is_file()
           for _, _, images in devbench_manifest(root, task, problems)[0] for i in images}
    if not ids:
        raise VlmergeError(f"{root}: no DevBench manifests under assets/ ({', '.join(DEVBENCH_FOLDERS.values())})")
    return [ImageItem(i, root / i, None) for i in ids]


def read_image_source(src: ImageSource, problems: ProblemLog) -> list[ImageItem]:
    path = Path(src.manifest)
    if src.format == "jsonl":
        return read_jsonl_manifest(path, problems)
    if src.format == "devbench":
        return read_devbench_images(path, problems)
    images_dir = Path(src.images_dir) if src.images_dir else path.parent
    return read_babylm_captions(path, images_dir, problems)


def unique_images(items: Iterable[ImageItem], problems: ProblemLog) -> list[ImageItem]:
    """One item per image id, in first-seen order; an id listed with two different files is a problem."""
    seen: dict[str, ImageItem] = {}
    for item in items:
        first = seen.setdefault(item.image_id, item)
        if first.path != item.path:
            problems.add(item.image_id, f"conflicting paths: {first.path} and {item.path} (kept the first)")
    return list(seen.values())
