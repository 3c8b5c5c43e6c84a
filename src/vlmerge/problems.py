"""Per-item problems (a corrupt image, a malformed line): recorded, counted, reported, not fatal."""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from vlmerge.errors import VlmergeError


@dataclasses.dataclass
class ProblemLog:
    """Collects (where, what) pairs, e.g. ("captions.jsonl:17", "not valid JSON")."""

    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, where: str, what: str) -> None:
        self.items.append((where, what))

    def __len__(self) -> int:
        return len(self.items)

    def kinds(self) -> collections.Counter:
        """Counts by the problem's first words (its kind), e.g. {'missing image': 3}."""
        return collections.Counter(what.split(":")[0] for _, what in self.items)

    def report(self, label: str, *, show: int = 5, file: TextIO | None = None) -> None:
        """Print a count by kind and the first few problems; nothing when there are none."""
        if not self.items:
            return
        file = file or sys.stderr
        kinds = ", ".join(f"{n} {k}" for k, n in self.kinds().most_common())
        print(f"{label}: {len(self.items)} problem(s) ({kinds})", file=file)
        for where, what in self.items[:show]:
            print(f"  {where}: {what}", file=file)
        if len(self.items) > show:
            print(f"  … and {len(self.items) - show} more", file=file)


def read_jsonl(path: Path, problems: ProblemLog, what: str = "file") -> Iterator[tuple[str, dict]]:
    """(file:line, object) for each JSON-object line; malformed lines go to `problems`."""
    if not path.is_file():
        raise VlmergeError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # one bad byte spoils its line, not the file
                problems.add(where, f"malformed line: not UTF-8 (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(where, f"malformed line: {e.msg}")
                continue
            if not isinstance(obj, dict):
                problems.add(where, "malformed line: expected a JSON object")
                continue
            yield where, obj
