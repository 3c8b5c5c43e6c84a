"""Shared fixtures: one demo world per session, and configs rooted in a test's own folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmerge.config import Config, load_config
from vlmerge.launch import allotted_cpus, use_allotted_cpus

# Under pytest-xdist the workers share the CPUs: each worker, and every process it starts, gets its
# part (what an array task packed beside others on a node gets).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 0)):
    use_allotted_cpus(max(1, allotted_cpus() // workers))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BLIMP = SHARED / "data" / "blimp"
# A small world and training settings that train a run in seconds.
SMALL_WORLD = ["demo.text_words=3000", "demo.n_images=200", "demo.n_winoground=10", "demo.pairs_per_phenomenon=10"]
# Both twins two epochs (the demo config gives the multimodal twin one epoch of text + captions).
FAST_TRAIN = ["checkpoints.words=[1000, 2000, 5000]", "train.micro_batch_size=8", "train.epochs=2",
              "runs.multimodal.epochs=2", "train.log_every=1"]
PREPARED = ["demo", "features", "runs/demo/tokenizer", "runs/demo/corpus"]


# Tests that need a system component carry its marker; without the component they are skipped
# with one line saying how to install it, except in CI (CI=true), where that is a failure.
INSTALL = "as root: bash env/system-packages.sh (make test does this)"


def missing_component(marker: str) -> str | None:
    """Why the tests marked `marker` cannot run here, or None when they can."""
    if marker == "slurm":
        if shutil.which("sbatch") is None:
            return f"Slurm is not installed ({INSTALL})"
        if os.geteuid() != 0:
            return "the local Slurm cluster needs root (slurmd and munged run as root/munge)"
    if marker == "browser" and shutil.which("chromium") is None:
        return f"Chromium is not installed ({INSTALL})"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slurm_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.slurm)
    # The Slurm tests are the longest chain: they go first, those without the shared twins first of all;
    # of the other modules those that read the twins go first, so that the twins are trained while the
    # first Slurm tests run, not after. Modules stay whole (their fixtures are set up once).
    reads_twins = {item.module for item in items if "twins" in item.fixturenames}

    def order(item) -> tuple[bool, bool]:
        if item.get_closest_marker("slurm"):
            return False, "twins" in item.fixturenames
        return True, item.module not in reads_twins

    items.sort(key=order)
    for marker in ("slurm", "browser"):
        reason = missing_component(marker)
        marked = [item for item in items if item.get_closest_marker(marker)]
        if reason is None or not marked:
            continue
        if os.environ.get("CI") == "true":
            raise pytest.UsageError(f"CI: {len(marked)} {marker} test(s) cannot run: {reason}")
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's load balancing, except that the Slurm tests (one local cluster, jobs that
    compete for its CPUs) run on one worker, one after the other, in collection order.
    (xdist's own `--dist loadgroup` marks no longer reach pytest 9's node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if "slurm" in nodeid.split("::")[0] else nodeid

    return SlurmTogether(config, log)


def pytest_report_header(config):
    reasons = [f"{m} tests skipped: {r}" for m in ("slurm", "browser") if (r := missing_component(m))]
    return reasons or None


def vlmerge_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run `python -m vlmerge ARGS` from the repository root and capture its output."""
    return subprocess.run([sys.executable, "-m", "vlmerge", *args], capture_output=True, text=True, cwd=REPO, **kw)


@pytest.fixture(scope="session")
def real_blimp() -> Path:
    """The real BLiMP of ../shared/data/blimp (CI puts ../shared beside the checkout)."""
    assert BLIMP.is_dir(), f"{BLIMP}: real BLiMP not found; ../shared must sit beside the checkout"
    return BLIMP


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, even when pytest-xdist runs the tests in several
    worker processes: the workers share one folder, and a file lock lets the first one build it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder, done = base / name, base / f"{name}.done"
    with FileLock(base / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    from vlmerge.demo import DemoWorld, generate

    folder = built_once(tmp_path_factory, "world", lambda f: generate(f / "demo", seed=0, progress=False))
    return DemoWorld.load(folder / "demo")


@pytest.fixture
def make_cfg(tmp_path, demo_world):
    """Config factory: the embedded demo config rooted at tmp_path, the session's world linked in."""
    root = tmp_path / "out"
    root.mkdir(exist_ok=True)
    if not (root / "demo").exists():
        os.symlink(demo_world.root, root / "demo")

    def make(*overrides: str) -> Config:
        return load_config(None, [f"paths.root={root}", "features.num_workers=0", *overrides])

    return make


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory) -> Path:
    """A root holding the small world, its tokenizer, token shards and features."""

    def prepare(root: Path) -> None:
        for stage in ("demo-data", "tokenizer", "corpus", "precompute"):
            r = vlmerge_cli(stage, "--quiet", f"paths.root={root}", *SMALL_WORLD)
            assert r.returncode == 0, r.stderr

    return built_once(tmp_path_factory, "prepared", prepare)


def link_prepared(root: Path, prepared: Path) -> Path:
    """`root` sharing the prepared inputs (symlinks), with no runs yet."""
    for rel in PREPARED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(prepared / rel, root / rel)
    return root


@pytest.fixture(scope="session")
def fresh_root(small_prepared, tmp_path_factory):
    """Factory of output roots that share the prepared inputs and start with no runs."""
    return lambda: link_prepared(tmp_path_factory.mktemp("root"), small_prepared)


@pytest.fixture(scope="session")
def twins(small_prepared, tmp_path_factory) -> Path:
    """Both twins trained without interruption: the reference that other tests read and copy, never
    change (every test worker shares it)."""

    def train_both(root: Path) -> None:
        link_prepared(root, small_prepared)
        for run in ("text", "multimodal"):
            r = vlmerge_cli("train", "--quiet", "--run", run, f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN)
            assert r.returncode == 0, r.stderr

    return built_once(tmp_path_factory, "twins", train_both)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The real local Slurm of slurm/local-cluster.sh, started once and left up."""
    from slurm_cluster import ensure_cluster

    ensure_cluster()


def stale_temp(target: Path, *, is_dir: bool = False) -> Path:
    """What a writer killed mid-write leaves beside `target`: its temp name, naming a process that is gone."""
    from vlmerge.io import temp_sibling

    dead = subprocess.Popen(["true"])
    dead.wait()
    path = target.parent / temp_sibling(target).name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path
