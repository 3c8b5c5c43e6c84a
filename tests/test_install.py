"""The package installs alone: its wheel declares every third-party module the code imports, and
`pip install` of the wheel into a fresh venv, pinned by env/constraints.txt, gives a `vlmerge` whose
`eval` runs a BabyLM task that needs statsmodels (reading), with the numbers of the source tree.

The fresh venv's install reads the package index (`make setup` has filled pip's cache with the same
pinned files, so it is mostly local); see docs/install.md for what it costs.
"""

from __future__ import annotations

import ast
import email.parser
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from vlmerge.cli import main

from conftest import REPO
from test_babylm_tasks import make_tiny_lm, reading_csv
from test_layering import SOURCES, build_wheel

# Modules whose third-party imports belong to an extra (pyproject's optional-dependencies), not to
# the base requirements: nothing else imports them at import time.
EXTRA_MODULES: dict[str, str] = {}
# Requirements that another package imports for us: torch.utils.tensorboard (train.monitor) needs tensorboard.
IMPORTED_THROUGH = {"tensorboard"}
# What a fresh venv holds besides what the wheel pulls in (venv's own installers, and the wheel itself).
VENV_TOOLS = {"pip", "setuptools", "vlmerge"}


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares names (PyYAML = pyyaml, lm_eval = lm-eval)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> dict[str, list[tuple[str, str]]]:
    """Top-level module -> (file, file:line) of each import of it in src/, precompute/ and analysis/
    (function-level imports included), the standard library and vlmerge itself aside."""
    found: dict[str, list[tuple[str, str]]] = {}
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"vlmerge"}:
                    found.setdefault(top, []).append((where, f"{where}:{node.lineno}"))
    return found


def declared(wheel: Path) -> dict[str | None, set[str]]:
    """The wheel's Requires-Dist (METADATA), by extra: None for the base requirements."""
    with zipfile.ZipFile(wheel) as z:
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    extras = meta.get_all("Provides-Extra") or []
    by_extra: dict[str | None, set[str]] = {None: set(), **{e: set() for e in extras}}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        for extra in [None] if req.marker is None else [e for e in extras if req.marker.evaluate({"extra": e})]:
            by_extra[extra].add(canonical(req.name))
    return by_extra


def undeclared_imports(imports: dict[str, list[tuple[str, str]]], requirements: dict[str | None, set[str]],
                       extra_modules: dict[str, str]) -> list[str]:
    """One line per import that no requirement covers: a module of an extra may use the base
    requirements and its extra's, every other module the base ones only."""
    providers = importlib.metadata.packages_distributions()  # top-level module -> distributions here
    problems = []
    for top, uses in sorted(imports.items()):
        dists = {canonical(d) for d in providers.get(top, [])}
        for file, where in uses:
            allowed = requirements[None] | requirements.get(extra_modules.get(file), set())
            if not dists:
                problems.append(f"{where}: import {top}: no installed distribution provides it")
            elif not dists & allowed:
                extra = f"[project.optional-dependencies] {extra_modules[file]}" if file in extra_modules else \
                    "[project] dependencies"
                problems.append(f"{where}: import {top}: declare {' or '.join(sorted(dists))} in pyproject.toml's "
                                f"{extra}")
    return problems


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_every_import_is_a_declared_requirement_and_every_requirement_is_imported(wheel):
    imports, requirements = third_party_imports(), declared(wheel)
    assert "statsmodels" in imports and "lm_eval" in imports  # the walk sees a task's and the bridge's imports
    problems = undeclared_imports(imports, requirements, EXTRA_MODULES)
    assert not problems, "third-party imports the wheel does not declare:\n" + "\n".join(problems)
    providers = importlib.metadata.packages_distributions()
    imported = {canonical(d) for top in imports for d in providers.get(top, [])} | IMPORTED_THROUGH
    unused = {extra: sorted(names - imported) for extra, names in requirements.items() if names - imported}
    assert not unused, f"declared but imported nowhere in src/, precompute/, analysis/ (by extra): {unused}"
    assert {"lm-eval", "datasets", "huggingface-hub", "wandb"} <= requirements[None]


def test_the_check_names_an_undeclared_import():
    imports = {"statsmodels": [("src/vlmerge/evaluate/tasks/reading.py", "src/vlmerge/evaluate/tasks/reading.py:37")],
               "lm_eval": [("src/vlmerge/evaluate/harness.py", "src/vlmerge/evaluate/harness.py:35"),
                           ("src/vlmerge/evaluate/run.py", "src/vlmerge/evaluate/run.py:9")],
               "no_such_module_xyz": [("analysis/run.py", "analysis/run.py:3")]}
    problems = undeclared_imports(imports, {None: {"numpy"}, "harness": {"lm-eval"}},
                                  {"src/vlmerge/evaluate/harness.py": "harness"})
    assert problems == [
        "src/vlmerge/evaluate/run.py:9: import lm_eval: declare lm-eval in pyproject.toml's [project] dependencies",
        "analysis/run.py:3: import no_such_module_xyz: no installed distribution provides it",
        "src/vlmerge/evaluate/tasks/reading.py:37: import statsmodels: declare statsmodels in pyproject.toml's "
        "[project] dependencies"]


def pins(constraints: Path) -> dict[str, Version]:
    """name -> version of every `name==version` line of a constraints file."""
    found = {}
    for line in constraints.read_text().splitlines():
        if "==" in (line := line.split("#")[0].strip()):
            name, version = line.split("==")
            found[canonical(name)] = Version(version)
    return found


@pytest.mark.slow
def test_the_wheel_alone_in_a_fresh_venv_runs_vlmerge_eval_of_reading(wheel, tmp_path):
    venv = tmp_path / "venv"
    # nothing of this checkout or of the test's own venv may leak in: no PYTHONPATH, no user site
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"PYTHONNOUSERSITE": "1"}

    def run(*argv: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=tmp_path)

    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python, vlmerge = venv / "bin" / "python", venv / "bin" / "vlmerge"
    # --no-compile: the .pyc of every installed module would triple the install's time; Python
    # writes those it imports on first use
    r = run(python, "-m", "pip", "install", "-q", "--no-compile", wheel, "-c", REPO / "env" / "constraints.txt")
    assert r.returncode == 0, r.stderr[-3000:]
    # the venv holds the pinned versions only (env/constraints.txt; torch's local label, +cpu, aside)
    listed = json.loads(run(python, "-m", "pip", "list", "--format=json").stdout)
    pinned = pins(REPO / "env" / "constraints.txt")
    off = [f"{d['name']}=={d['version']}" for d in listed if canonical(d["name"]) not in VENV_TOOLS
           and pinned.get(canonical(d["name"])) != Version(Version(d["version"]).public)]
    assert not off, f"installed but not pinned at that version in env/constraints.txt: {off}"
    where = run(python, "-c", "import vlmerge; print(vlmerge.__file__)").stdout.strip()
    assert where.startswith(str(venv)), where

    for argv in (["--help"], ["eval", "--help"]):
        r = run(vlmerge, *argv)
        assert r.returncode == 0 and r.stdout.startswith("usage: vlmerge"), r.stderr[-2000:]

    model, data = tmp_path / "model", reading_csv(tmp_path / "reading_data.csv")
    for part in make_tiny_lm():  # a Llama and its byte-level BPE: every word of the texts has its own tokens
        part.save_pretrained(model)
    args = ["eval", "--quiet", "--model", str(model), "--task", f"reading={data}", f"paths.root={tmp_path / 'root'}"]
    r = run(vlmerge, *args, "--out", tmp_path / "installed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "source")]) == 0  # the same command from this checkout
    columns = ["task", "subtask", "metric", "value"]
    installed, source = (pd.read_parquet(tmp_path / out / "results.parquet")[columns] for out in ("installed", "source"))
    assert {("reading", "", "eye_tracking"), ("reading", "", "self_paced_reading")} <= \
        set(installed[["task", "subtask", "metric"]].itertuples(index=False, name=None))
    assert all(math.isfinite(v) for v in installed["value"])
    pd.testing.assert_frame_equal(installed, source)

    r = run(python, "-c", "import vlmerge.evaluate.harness")  # the harness bridge's lm-eval came with it
    assert r.returncode == 0, r.stderr[-2000:]
