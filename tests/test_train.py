"""Training on a small demo world, on the CPU, through the real CLI and DeepSpeed (gloo)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, LlamaForCausalLM

import vlmerge.model  # noqa: F401  (registers the model with the Auto classes, as a user would)
from vlmerge.card import read_front_matter
from vlmerge.config import load_config
from vlmerge.layout import list_checkpoints
from vlmerge.errors import PREEMPTED_EXIT as EXIT_CODE

from conftest import FAST_TRAIN, SMALL_WORLD, stale_temp, vlmerge_cli

SCHEDULE = [1000, 2000, 5000]


@pytest.fixture
def root(fresh_root) -> Path:
    return fresh_root()


@pytest.fixture
def finished_text_run(root) -> Path:
    """A root holding a finished text run of this test's own, to tamper with (the twins are shared)."""
    r = train(root, "text", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    return root


def train(root: Path, run: str, *extra: str, **kw) -> subprocess.CompletedProcess:
    return vlmerge_cli("train", "--quiet", "--run", run, f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, *extra, **kw)


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoints_land_exactly_on_the_schedule_and_epoch_ends(twins):
    cfg = load_config(None, [f"paths.root={twins}", *SMALL_WORLD])
    for run in ("text", "multimodal"):
        ckpts = list_checkpoints(cfg.layout.run_dir(run))
        states = [json.loads((c / "trainer_state.json").read_text()) for c in ckpts]
        words = [s["words_seen"] for s in states]
        per_epoch = states[-1]["words_seen"] // 2
        expected = sorted({0, *[w for w in SCHEDULE if w <= 2 * per_epoch], per_epoch, 2 * per_epoch})
        assert words == expected
        assert [c.name for c in ckpts] == [f"words-{w:012d}" for w in words]
        assert states[0]["step"] == 0 and states[-1]["epoch"] == 2
        assert all(s["tokens_seen"] >= s["words_seen"] for s in states[1:])
        # each checkpoint's model card: its training data and words seen, in the Hub's front matter format
        for c, s in zip(ckpts, states):
            card = (c / "README.md").read_text()
            front = read_front_matter(card)
            assert front["library_name"] == "transformers" and "base_model" not in front  # trained from scratch
            assert f"words seen: {s['words_seen']:,}" in card and f"run `{run}`" in card
            assert all(f"`{f}`" in card for f in cfg.data.text)
            assert ("image features" in card) == (run == "multimodal")


def test_checkpoints_load_with_from_pretrained_bitwise(twins):
    ckpt = list_checkpoints(load_config(None, [f"paths.root={twins}", *SMALL_WORLD]).layout.run_dir("multimodal"))[2]
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    assert type(model).__name__ == "PooledLlavaForConditionalGeneration"
    assert not any("vision_tower" in k for k in model.state_dict())
    assert_bitwise_equal({k: v for k, v in model.state_dict().items()}, tensors(ckpt))


def test_the_twins_start_from_identical_weights(twins):
    cfg = load_config(None, [f"paths.root={twins}", *SMALL_WORLD])
    text, mm = (list_checkpoints(cfg.layout.run_dir(r))[0] for r in ("text", "multimodal"))
    assert text.name == mm.name == "words-000000000000"
    assert (text / "model.safetensors").read_bytes() == (mm / "model.safetensors").read_bytes()
    # ...and then they diverge, each on its own data.
    assert not torch.equal(tensors(list_checkpoints(cfg.layout.run_dir("text"))[-1])["lm_head.weight"],
                           tensors(list_checkpoints(cfg.layout.run_dir("multimodal"))[-1])["lm_head.weight"])


def test_metrics_log_loss_lr_and_throughput(twins):
    rows = [json.loads(l) for l in (twins / "runs/demo/text/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"lr", "words", "tokens", "words_per_s", "tokens_per_s", "epoch"} <= rows[0].keys()


def test_export_text_writes_a_llama_that_computes_the_same_logits(twins, tmp_path):
    ckpt = list_checkpoints(twins / "runs/demo/text")[-1]
    r = vlmerge_cli("export-text", str(ckpt), str(tmp_path / "lm"))
    assert r.returncode == 0, r.stderr
    lm = LlamaForCausalLM.from_pretrained(tmp_path / "lm")
    llava = AutoModelForImageTextToText.from_pretrained(ckpt)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        ref = llava.model.language_model(input_ids=ids).last_hidden_state
        assert torch.equal(lm.model(input_ids=ids).last_hidden_state, ref)
    assert (tmp_path / "lm" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_sigusr1_midway_then_restart_ends_bitwise_equal(twins, root):
    cmd = [sys.executable, "-m", "vlmerge", "train", "--quiet", "--run", "text", f"paths.root={root}", *SMALL_WORLD,
           *FAST_TRAIN]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = root / "runs/demo/text/metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_CODE, err
    assert "run the same command again to resume" in err
    states = root / "runs/demo/text/deepspeed"
    stopped_at = json.loads((states / (states / "latest").read_text().strip() / "state.json").read_text())
    assert 10 <= stopped_at["step"]

    r = train(root, "text")
    assert r.returncode == 0, r.stderr
    resumed = list_checkpoints(root / "runs/demo/text")
    straight = list_checkpoints(twins / "runs/demo/text")
    assert [c.name for c in resumed] == [c.name for c in straight]
    for a, b in zip(resumed, straight):
        assert_bitwise_equal(tensors(a), tensors(b))
    rows = [json.loads(l) for l in (root / "runs/demo/text/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # no step logged twice


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_after_every_step(root):
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vlmerge", "--", "train", "--quiet", "--run", "multimodal", f"paths.root={root}", *SMALL_WORLD,
         *FAST_TRAIN,
         "train.check_replicas=true", "train.micro_batch_size=4"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (root / "runs/demo/multimodal/metrics.jsonl").read_text().splitlines()]
    assert len(rows) > 20 and all(len(set(row["replica_digests"])) == 1 and len(row["replica_digests"]) == 2
                                  for row in rows)


# A fixed global batch of 8 in micro-batches of 4: one rank accumulates 2, two ranks 1 each.
RESIZABLE = ["train.micro_batch_size=4", "train.global_batch=8"]


def train_on(root: Path, ranks: int, run: str = "text", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`vlmerge train` on `ranks` ranks (torchrun for more than one: gloo on the CPU, NCCL on GPUs),
    started, not waited for."""
    args = ["train", "--quiet", "--run", run, f"paths.root={root}", *SMALL_WORLD, *FAST_TRAIN, *RESIZABLE, *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "vlmerge", "--"]
    cmd = [sys.executable, *(launcher if ranks > 1 else ["-m", "vlmerge"]), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_midway(proc: subprocess.Popen, root: Path, ranks: int, steps: int = 30) -> int:
    """SIGUSR1 to the training process(es) once `steps` steps are logged; the step its state was saved at."""
    metrics = root / "runs/demo/text/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            pid = proc.pid
            # torchrun's workers are its children; a flag on any rank stops every rank at the same step
            workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if ranks > 1 else [pid]
            for worker in workers:
                os.kill(int(worker), signal.SIGUSR1)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-2000:]  # 75, or torchrun's 1 for its workers' 75
    states = root / "runs/demo/text/deepspeed"
    return json.loads((states / (states / "latest").read_text().strip() / "state.json").read_text())["step"]


def metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "runs/demo/text/metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_ranks_with_the_same_batches(fresh_root, before, after):
    reference = fresh_root()
    straight = train_on(reference, 1)
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-2000:]
    root = fresh_root()
    assert stop_midway(train_on(root, before), root, before) >= 30
    resumed = train_on(root, after)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]

    # The same samples in the same steps (a digest of every batch, logged per step)...
    assert [(r["step"], r["data"], r["tokens"]) for r in metrics(root)] == \
           [(r["step"], r["data"], r["tokens"]) for r in metrics(reference)]
    # ...and the same weights at every checkpoint, up to the order of fp32 sums (here: bitwise).
    ours, theirs = (list_checkpoints(r / "runs/demo/text") for r in (root, reference))
    assert [c.name for c in ours] == [c.name for c in theirs]
    for a, b in zip(ours, theirs):
        ta, tb = tensors(a), tensors(b)
        assert all(torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6) for k in ta), a.name


def test_a_state_resumes_on_other_ranks_only_when_the_batch_and_the_optimizer_state_allow(tmp_path):
    from vlmerge.errors import VlmergeError
    from vlmerge.train.checkpoint import StateStore

    on_one = StateStore(tmp_path, 2, rank=0, world=1, global_batch=8)
    assert on_one._source_rank(tmp_path, {"world": 2, "global_batch": 8}, zero=False) == 0
    assert StateStore(tmp_path, 2, rank=1, world=2, global_batch=8)._source_rank(
        tmp_path, {"world": 1, "global_batch": 8}, zero=False) == 0  # rank 1 of 2 takes the one saved rank's
    with pytest.raises(VlmergeError, match="global batch of 16 examples; on 1 rank.s. it would be 8: set train.global_batch"):
        on_one._source_rank(tmp_path, {"world": 2, "global_batch": 16}, zero=False)
    with pytest.raises(VlmergeError, match="with ZeRO, which partitions the optimizer state over the ranks; resume it on 2"):
        on_one._source_rank(tmp_path, {"world": 2, "global_batch": 8}, zero=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.deepspeed={zero_optimization: {stage: 9}}", "train.deepspeed: DeepSpeed rejected the config"),
        ("features.name=nonexistent", "nonexistent.h5: feature store not found"),
        ("tokenizer.image_token=<vision>", "tokenizer has no '<vision>' token"),
    ],
)
def test_bad_inputs_exit_nonzero_in_one_line(root, override, message):
    r = train(root, "text", override)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and message in lines[-1], r.stderr
    assert len([l for l in lines if "error" in l.lower()]) == 1


@pytest.mark.slow
def test_seed_pretraining_gives_both_twins_the_seed_runs_last_weights(root):
    seed_on = ["runs.seed_pretraining=true", "runs.seed.epochs=1"]
    refused = train(root, "text", *seed_on)  # no seed checkpoint yet
    assert refused.returncode == 2 and "train the seed run first" in refused.stderr
    r = train(root, "seed", *seed_on)
    assert r.returncode == 0, r.stderr
    r = train(root, "text", *seed_on, "train.epochs=1")
    assert r.returncode == 0, r.stderr
    seed_last = list_checkpoints(root / "runs/demo/seed")[-1]
    text_first = list_checkpoints(root / "runs/demo/text")[0]
    assert text_first.name == "words-000000000000"
    assert_bitwise_equal(tensors(text_first), tensors(seed_last))


class _Evil:
    """Unpickling this creates the file it names: what a crafted state file could do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


CRAFTED = {  # how a copied run directory may have been tampered with -> what the resume must say
    "planted_pt": None,  # DeepSpeed's pickle file beside vlmerge's state: never read, the run stays finished
    "pt_only": "engine.json: training state file missing",  # only pickles, as older versions (or an attacker) left
    "latest_escapes": "latest: names '../../../../etc', expected one of this run's state folders",
    "latest_missing": "latest: names 'step-000999999', expected one of this run's state folders",
    "foreign_object": "rank-00000.json: not a training state written by vlmerge",  # JSON may not name a class
}


@pytest.mark.slow
def test_a_crafted_resume_state_cannot_run_code_and_is_refused_in_one_line(finished_text_run, tmp_path):
    # The finished run itself is tampered with, and its resumable state restored after each case.
    states = finished_text_run / "runs/demo/text/deepspeed"
    pristine = tmp_path / "pristine"
    shutil.copytree(states, pristine)
    marker = tmp_path / "pwned"
    for case, expect in CRAFTED.items():
        tag = states / (states / "latest").read_text().strip()
        torch.save({"module": _Evil(marker)}, tag / "mp_rank_00_model_states.pt")
        if case == "pt_only":
            for f in tag.iterdir():
                if f.name not in ("mp_rank_00_model_states.pt", "state.json"):
                    f.unlink()
        elif case == "latest_escapes":
            (states / "latest").write_text("../../../../etc\n")
        elif case == "latest_missing":
            (states / "latest").write_text("step-000999999\n")
        elif case == "foreign_object":
            (tag / "rank-00000.json").write_text(
                json.dumps({"dict": [["optimizer", {"object": "Popen", "attrs": {}}], ["rng", None]]}))
        r = train(finished_text_run, "text", "train.epochs=1")
        assert not marker.exists(), case
        if expect is None:
            assert r.returncode == 0, r.stderr
        else:
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and expect in lines[-1], (case, r.stderr)
        shutil.rmtree(states)
        shutil.copytree(pristine, states)


@pytest.mark.slow
def test_a_rerun_removes_what_a_killed_run_left_and_nothing_else(finished_text_run):
    run = finished_text_run / "runs/demo/text"
    left = [stale_temp(run / "checkpoints/words-000000009999", is_dir=True),
            stale_temp(run / "deepspeed/step-000000099", is_dir=True), stale_temp(run / "metrics.jsonl")]
    foreign = [run / "checkpoints/.notes.tmp-mine", run / "deepspeed/my-notes.txt"]
    for f in foreign:
        f.write_text("the user's")
    log = run / "metrics.jsonl"
    logged = log.read_text()
    with open(log, "a") as f:
        f.write('{"step": 99, "lo')  # a line torn by the kill
    r = train(finished_text_run, "text", "train.epochs=1")
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in left)
    assert all(f.read_text() == "the user's" for f in foreign)
    assert log.read_text() == logged


# One short training: enough to reach the first step, state and checkpoint.
SHORT = ("train.epochs=1", "checkpoints.words=[1000]")


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (its exit code 2 checked)."""
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 2 and len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    return errors[0]


def test_a_second_training_of_a_run_is_refused_in_one_line_and_a_dead_ones_lock_taken_over(root):
    from vlmerge.io import HOST
    from vlmerge.layout import run_lock
    from vlmerge.locks import hold

    lock = run_lock(root / "runs/demo/text")
    with hold(lock, "train --run text"):  # a training of this run still going (this process stands in)
        line = one_error_line(train(root, "text", *SHORT))
    assert str(lock) in line and f"host {HOST}, pid {os.getpid()}" in line, line
    assert sorted(p.name for p in lock.parent.iterdir()) == []  # nothing logged or saved beside the first

    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": HOST, "pid": dead.pid, "started": "then", "what": "train", "token": "x"}))
    r = train(root, "text", *SHORT)  # the killed training's lock is taken over
    assert r.returncode == 0, r.stderr[-3000:]
    assert not lock.exists()


def test_a_finished_run_is_known_as_such_while_another_holds_its_lock(finished_text_run):
    # Sung et al.'s study makes sure of a shared seed run from several array tasks at once, on
    # several nodes: each must see it trained without taking the lock another one holds.
    from vlmerge.layout import run_lock
    from vlmerge.locks import hold
    from vlmerge.train.loop import finished

    def cfg(*extra: str):
        return load_config(None, [f"paths.root={finished_text_run}", *SMALL_WORLD, *FAST_TRAIN, *extra])

    with hold(run_lock(finished_text_run / "runs/demo/text"), "train --run text"):
        assert finished(cfg("train.epochs=1"), "text")
        assert not finished(cfg("train.epochs=2"), "text")  # more epochs: not finished
        assert not finished(cfg("train.epochs=1", "train.lr=0.5"), "text")  # other settings: not this run
    assert not finished(cfg(), "multimodal")  # never started


def test_a_stale_extension_build_lock_does_not_hang_training(root, tmp_path):
    # What a training killed while DeepSpeed compiled its shared-memory op leaves: torch's lock file,
    # naming no process, on which every later build waited forever.
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    r = train(root, "text", *SHORT, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("limit, what", [(300_000, "checkpoint"), (1_000_000, "training state")])
def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_output(root, limit, what):
    def full_disk():  # writes beyond `limit` bytes fail (EFBIG) as on a full disk: the checkpoint, or the state
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    line = one_error_line(train(root, "text", *SHORT, preexec_fn=full_disk))
    assert f"could not write the {what} (" in line and "File too large" in line, line
    run = root / "runs/demo/text"
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    states = run / "deepspeed"
    assert not states.exists() or not any(states.iterdir())
    assert all((c / "trainer_state.json").is_file() for c in (run / "checkpoints").iterdir())


def test_a_symlink_planted_as_the_runs_log_is_refused_not_followed(root, tmp_path):
    outside = tmp_path / "outside.jsonl"
    run = root / "runs/demo/text"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").symlink_to(outside)  # dangling: a write through it would create it
    line = one_error_line(train(root, "text", *SHORT))
    assert "metrics.jsonl: is a symbolic link" in line, line
    assert not outside.exists()
def test_a_root_copied_elsewhere_skips_its_finished_stages_instead_of_refusing(small_prepared, twins, tmp_path):
    # Fingerprints hold the paths inside the root relative to it (Layout.relative).
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(small_prepared), str(copy)], check=True)
    subprocess.run(["cp", "-a", str(twins / "runs/demo/text"), str(copy / "runs/demo/text")], check=True)
    for stage, done in (("demo-data", "demo-data:"), ("tokenizer", "is up to date"),
                        ("corpus", "is up to date"), ("precompute", "is complete")):
        r = vlmerge_cli(stage, "--quiet", f"paths.root={copy}", *SMALL_WORLD)
        assert r.returncode == 0 and done in r.stdout, (stage, r.stderr)
    before = sorted(p.name for p in (copy / "runs/demo/text/checkpoints").iterdir())
    r = train(copy, "text")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (copy / "runs/demo/text/checkpoints").iterdir()) == before


def test_training_state_round_trips_without_pickle_and_names_no_class(tmp_path):
    import collections
    import enum

    from vlmerge.errors import VlmergeError
    from vlmerge.train.safestate import load_state, save_state

    class Stage(enum.IntEnum):
        two = 2

    class Scaler:
        def __init__(self, scale: float):
            self.cur_scale, self.dynamic = scale, False

    Address = collections.namedtuple("Address", "numel start")
    shared = torch.arange(6.0)
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": shared[:3]}}, "betas": (0.9, 0.95),
             "stage": Stage.two, "scaler": Scaler(128.0), "slices": [{"w": Address(4, 0)}], "flat": shared,
             "none": None, "text": "x"}
    save_state(tmp_path, "part", state)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())
    live = {"stage": Stage.two, "scaler": Scaler(1.0), "slices": [{"w": Address(0, 0)}]}  # the engine's objects
    back = load_state(tmp_path, "part", live)
    assert torch.equal(back["state"][0]["exp_avg"], shared[:3]) and torch.equal(back["flat"], shared)
    assert back["betas"] == (0.9, 0.95) and back["stage"] is Stage.two and back["slices"][0]["w"] == Address(4, 0)
    assert back["scaler"] is live["scaler"] and live["scaler"].cur_scale == 128.0  # filled in, not built
    assert back["state"][0]["step"].item() == 3.0 and back["none"] is None and back["text"] == "x"

    skeleton = json.loads((tmp_path / "part.json").read_text())
    for node in skeleton["dict"]:
        if node[0] == "scaler":
            node[1]["attrs"]["update_scale"] = 1  # an attribute the live object does not have
    (tmp_path / "part.json").write_text(json.dumps(skeleton))
    with pytest.raises(VlmergeError, match="part.json: not a training state written by vlmerge .*no attribute"):
        load_state(tmp_path, "part", {"scaler": Scaler(1.0)})
    with pytest.raises(VlmergeError, match=r"\.scaler: a .*Scaler where this engine has NoneType"):
        load_state(tmp_path, "part", {})


_ENGINE_RESUME = """
import sys, tempfile, torch, deepspeed
from pathlib import Path
from vlmerge.train import distributed
from vlmerge.train.checkpoint import StateStore, TrainState
distributed.setup()
precision, zero = sys.argv[1], int(sys.argv[2])
def engine():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": zero},
           "bf16": {"enabled": precision == "bf16"}, "gradient_clipping": 1.0}
    return deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sched, config=cfg)[0]
def step(e, i):
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(i)).to(e.device)
    loss = e(x.bfloat16() if precision == "bf16" else x).float().pow(2).sum()
    e.backward(loss)
    e.step()
a, run = engine(), Path(tempfile.mkdtemp())
for i in range(3): step(a, i)
StateStore(run, 2, 0).save(a, TrainState(step=3))
for i in range(3, 6): step(a, i)
b = engine()
assert StateStore(run, 2, 0).load(b).step == 3
for i in range(3, 6): step(b, i)
same = all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
print("RESUMED", same, b.global_steps)
"""


@pytest.mark.slow
@pytest.mark.parametrize("precision, zero", [("fp32", 0), ("bf16", 0), ("fp32", 2)])
def test_pickle_free_state_resumes_bitwise_for_bf16_and_zero(precision, zero):
    r = subprocess.run([sys.executable, "-c", _ENGINE_RESUME, precision, str(zero)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RESUMED True 6" in r.stdout
