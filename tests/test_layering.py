"""The house's shape: layers that point one way, one owner of on-disk names, one installed package."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

# Folder on disk -> the package it installs as.
SOURCES = {REPO / "src" / "vlmerge": "vlmerge", REPO / "precompute": "vlmerge.precompute",
           REPO / "analysis": "vlmerge.analysis"}
SOURCES_ROOT = REPO / "src" / "vlmerge"
CORE = {"config", "layout", "modelkey", "io", "errors", "results", "registry", "problems", "hf", "configs", "device", "card",
        "predict", "locks"}
ORCHESTRATION = {"sweep", "launch", "pipeline", "study", "cli"}
STAGES = {"precompute", "data", "model", "train", "merge", "evaluate", "finetune", "demo"}


def group(module: str) -> str | None:
    """The package-level group of a vlmerge module: core, a stage, orchestration, or analysis."""
    parts = module.split(".")
    if parts[0] != "vlmerge":
        return None
    if len(parts) == 1 or parts[1] in CORE or not (SOURCES_ROOT / parts[1]).exists() and \
            not (SOURCES_ROOT / f"{parts[1]}.py").exists() and parts[1] not in {"precompute", "analysis"}:
        return "core"  # the package itself (`from vlmerge import code_version`) and core modules
    if parts[1] == "__main__":
        return "cli"
    assert parts[1] in STAGES | ORCHESTRATION | {"analysis"}, f"{module}: put it in a layer (tests/test_layering.py)"
    return parts[1]


def import_graph() -> dict[str, dict[str, list[str]]]:
    """group -> imported group -> the files that import it (function-level imports included)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for folder, package in SOURCES.items():
        for path in folder.rglob("*.py"):
            module = ".".join([package, *path.relative_to(folder).with_suffix("").parts]).removesuffix(".__init__")
            me = group(module)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                for name in names:
                    other = group(name)
                    if other and other != me:
                        graph.setdefault(me, {}).setdefault(other, []).append(str(path.relative_to(REPO)))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None


def test_the_package_graph_has_no_cycle_and_layers_point_one_way():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle between packages: {' -> '.join(find_cycle(graph))}"
    assert set(graph.get("core", {})) == set(), f"core imports {graph['core']}"
    assert set(graph.get("analysis", {})) <= {"core"}, f"analysis imports {graph['analysis']}"
    for stage in STAGES:
        upward = set(graph.get(stage, {})) & (ORCHESTRATION | {"analysis"})
        assert not upward, f"stage {stage} imports {upward}: {graph[stage]}"


def test_analysis_never_imports_torch():
    code = ("import sys, vlmerge.analysis.run, vlmerge.analysis.cli; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# On-disk names that only vlmerge/layout.py may spell: a string literal with one of them elsewhere
# in the code is a second owner of the layout (docstrings and --help texts may mention them).
NAME_PATTERNS = [r"(?<!\w)(words|step|alpha|endpoint|compact)-($|\d|\*)", r"-of-", r"\.shards", r"\.config\.yaml$",
                 r"metrics\.jsonl", r"best_text\.json", r"statistics-", r"\.(parquet|h5)$", r"^(metrics|items|distances)/"]
FOLDERS = {"metrics", "items", "distances", "checkpoints", "deepspeed", "runs", "results", "reports", "logs", "features",
           "tokenizer", "corpus"}


def string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string constant and f-string piece (docstrings and help= texts aside),
    and of every path joined with a folder name (`x / "metrics"`)."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            skip.update(id(n) for n in ast.walk(node.value))
    joined = [(n.lineno, f"/ {n.right.value}") for n in ast.walk(tree) if isinstance(n, ast.BinOp)
              and isinstance(n.op, ast.Div) and isinstance(n.right, ast.Constant) and n.right.value in FOLDERS]
    return joined + [(n.lineno, n.value) for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_only_the_layout_module_spells_on_disk_names():
    offenders = []
    for folder in SOURCES:
        for path in folder.rglob("*.py"):
            if path.name == "layout.py":
                continue
            for lineno, text in string_literals(ast.parse(path.read_text(encoding="utf-8"))):
                if text.startswith("/ ") or any(re.search(p, text) for p in NAME_PATTERNS):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {text!r}")
    assert not offenders, "on-disk names spelled outside vlmerge/layout.py:\n" + "\n".join(offenders)


def build_wheel(folder: Path) -> Path:
    """The wheel `pip wheel` builds from a copy of the repository's package sources (in `folder`)."""
    (folder / "src-tree").mkdir()
    for name in ("pyproject.toml", "README.md", "src", "precompute", "analysis"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, folder / "src-tree" / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(folder / "dist"), str(folder / "src-tree")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (folder / "dist").glob("*.whl")
    return wheel


def test_the_wheel_installs_only_the_vlmerge_package(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"vlmerge", "vlmerge-0.1.0.dist-info"}
    assert {"vlmerge/precompute/features.py", "vlmerge/analysis/run.py", "vlmerge/layout.py",
            "vlmerge/analysis/vendor/plotly-cartesian.min.js", "vlmerge/analysis/vendor/LICENSE-plotly.js"} <= set(names)
    top_level = zipfile.ZipFile(wheel).read("vlmerge-0.1.0.dist-info/top_level.txt").decode().split()
    assert top_level == ["vlmerge"]


@pytest.mark.parametrize("entry", [["-m", "vlmerge", "--help"], ["-m", "vlmerge.analysis", "--help"]])
def test_entry_points_start(entry):
    r = subprocess.run([sys.executable, *entry], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


# The documentation a clone has: the README and docs/. Nothing may send a reader to a file outside
# the repository (the design notes the project started from are not part of it).
DOC_SOURCES = ["src", "precompute", "analysis", "docs", "configs", "jobs", "slurm", "env"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".txt", ".toml"}
OUTSIDE_DOC = re.compile(r"DESIGN\.md|shared/DESIGN")
MAP_MAX_LINES = 40


def text_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    for folder in DOC_SOURCES:
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()
                  and "__pycache__" not in p.parts]
    return files


def test_no_docstring_or_doc_points_outside_the_repository():
    offenders = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in text_files()
                 for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
                 if OUTSIDE_DOC.search(line)]
    assert not offenders, "references to a design file a clone does not have (point to docs/ instead):\n" + \
        "\n".join(offenders)


def sections(markdown: str) -> list[tuple[int, int, str]]:
    """(level, line index, title) of every heading outside code fences."""
    out, fence = [], False
    for i, line in enumerate(markdown.splitlines()):
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"(#{1,6}) (.+)", line)):
            out.append((len(m[1]), i, m[2].strip()))
    return out


def test_the_readme_opens_with_a_short_map():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    heads = sections("\n".join(lines))
    (_, title_at, _), (level, map_at, name) = heads[0], heads[1]
    assert title_at == 0 and (level, name) == (2, "Map"), f"the README's first section is {name!r}, not the map"
    intro = [line for line in lines[title_at + 1:map_at] if line.strip()]
    assert 1 <= len(intro) <= 3, f"the README's intro before the map is {len(intro)} lines (1 to 3)"
    end = next((i for lvl, i, _ in heads[2:] if lvl <= 2), len(lines))
    assert end - map_at <= MAP_MAX_LINES, f"the README's map is {end - map_at} lines (at most {MAP_MAX_LINES})"


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_the_docs_links_and_anchors_resolve():
    broken = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, frag = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}: no such file")
            elif frag and dest.suffix == ".md" and frag not in {anchor(t) for _, _, t in
                                                                 sections(dest.read_text(encoding="utf-8"))}:
                broken.append(f"{doc.relative_to(REPO)}: {target}: no such heading")
    assert not broken, "\n".join(broken)
