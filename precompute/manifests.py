"""Image and caption manifests: JSONL {image_id, path, caption} and the BabyLM release layout."""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterable
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


def read_image_source(src: ImageSource, problems: ProblemLog) -> list[ImageItem]:
    path = Path(src.manifest)
    if src.format == "jsonl":
        return read_jsonl_manifest(path, problems)
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
