"""Reading task files: a file or a folder of them, JSON lines, required string fields."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.problems import ProblemLog, read_jsonl


def task_files(path: Path, suffixes: tuple[str, ...], expected: str) -> list[Path]:
    """`path` itself, or its folder's files with one of `suffixes` (sorted); none is an error."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise VlmergeError(f"{path}: no such file or folder (expected {expected})")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if not files:
        raise VlmergeError(f"{path}: no {' or '.join('*' + s for s in suffixes)} files (expected {expected})")
    return files


def read_records(path: Path, problems: ProblemLog, expected: str) -> Iterator[tuple[Path, str, dict]]:
    """(file, "file:line", object) for each JSON line of a .jsonl file or of a folder's .jsonl files."""
    for file in task_files(path, (".jsonl",), expected):
        for where, obj in read_jsonl(file, problems):
            yield file, where, obj


def strings(obj: dict, names: Sequence[str], where: str, problems: ProblemLog) -> list[str] | None:
    """obj's values for `names` when all are non-empty strings; else None, and the first bad one is a problem."""
    for name in names:
        if not isinstance(obj.get(name), str) or not obj[name]:
            problems.add(where, f"malformed line: {name!r} must be a non-empty string")
            return None
    return [obj[name] for name in names]


def optional_string(obj: dict, name: str) -> str | None:
    """obj[name] when it is a non-empty string, else None."""
    value = obj.get(name)
    return value if isinstance(value, str) and value else None
