"""`vlmerge sweep plan --estimate`: what a sweep will cost, calibrated on this machine and device.

Calibration runs what a sweep worker runs, small: load one checkpoint pair, merge one α of each
method, tokenise and score an evenly spread sample of each task's items (`--sample`: 200 on the CPU,
2000 on a GPU, whose batches 200 items would leave idle) twice, the second run timed, and measure the
pair's weight distances. The sweep then costs

    a worker's start   the imports (timed in a fresh interpreter), the features and the tasks' data
    per item           loading its pair; tokenising every task (once per item); then per α a merge and
                       a scoring of every item of every task (the sample's time × items / sample)
    per endpoint       each unmerged checkpoint scored once
    per pair           its weight distances (sweep.distances)
    the probe          with sweep.probe, its signals of every model (timed on the calibration model);
                       with sweep.search adaptive, every α probed and sweep.search_budget of them
                       (rounded up) merged again and scored

laid out as the Slurm array is (items per array task), with a worker's peak memory and the disk
that the results take (their rows × the bytes a row takes in Parquet, measured on the sample).
Before the runs are trained the plan is projected from the checkpoint schedule and the words per
epoch (the corpus's, or `--words-per-epoch`), and an untrained model of `model.*` is calibrated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from vlmerge.config import Config
from vlmerge.data import FeatureTable
from vlmerge.device import resolve_device
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.tasks import get_task
from vlmerge.evaluate.probe import ProbeSet, signals
from vlmerge.evaluate.run import (PreparedTask, babylm_files, config_scorer, evaluate, fitting, load_model, prepare,
                                  result_rows, task_specs)
from vlmerge.io import read_json
from vlmerge.layout import best_text_cache, checkpoint_dir, checkpoint_words, list_checkpoints
from vlmerge.merge.core import Pair, PairMerger
from vlmerge.merge.distance import distance_rows
from vlmerge.merge.experts import is_expert_method
from vlmerge.merge.methods import get_method
from vlmerge.merge.statistics import STATISTICS
from vlmerge.problems import ProblemLog
from vlmerge.results import ITEMS_SCHEMA, RESULTS_SCHEMA, ModelKey, write_rows
from vlmerge.sweep.plan import (BEST_TEXT_RUNS, Checkpoints, WorkItem, all_checkpoints, array_layout, best_text_data,
                                best_text_salt, plan, probing, run_checkpoints, sweep_runs, sweep_tasks)
from vlmerge.sweep.run import endpoint_id, finished
from vlmerge.train.schedule import checkpoint_words as schedule_words

SAMPLE = {"cpu": 200, "cuda": 2000}
GIB = 1 << 30


# -- the plan before training ---------------------------------------------------------------------

def corpus_words(cfg: Config, run: str) -> int | None:
    """Words per epoch of a run, from its sources' token shards (None when the corpus is not built)."""
    from vlmerge.precompute.corpus import TokenShards

    total = 0
    for source in getattr(cfg.runs, run).sources:
        folder = cfg.layout.corpus_source_dir(source)
        if not folder.is_dir():
            return None
        total += int(TokenShards(folder).words().sum())
    return total


def projected_checkpoints(cfg: Config, run: str, words_per_epoch: int) -> list[Path]:
    """The checkpoints training will write: step 0, the schedule's word counts up to the run's end,
    and every epoch's end (checkpoints.every_epoch)."""
    epochs = getattr(cfg.runs, run).epochs or cfg.train.epochs
    end = epochs * words_per_epoch
    words = {0, *(w for w in schedule_words(cfg.checkpoints.words) if w <= end)}
    if cfg.checkpoints.every_epoch:
        words |= {e * words_per_epoch for e in range(1, epochs + 1)}
    return [checkpoint_dir(cfg.layout.run_dir(run), w) for w in sorted(words)]


def checkpoints_of(cfg: Config, words_per_epoch: Mapping[str, int]) -> tuple[dict[str, list[Path]] | None, str]:
    """The sweep's runs' checkpoints: on disk when every run has them (None), else projected; and a
    line saying which."""
    runs = sweep_runs(cfg)
    if all(len(list_checkpoints(cfg.layout.run_dir(r))) > 1 for r in runs):
        return None, "the trained runs' checkpoints"
    projected, said = {}, []
    for run in runs:
        words = words_per_epoch.get(run) or corpus_words(cfg, run)
        if not words:
            raise VlmergeError(f"sweep plan --estimate: run {run} has no checkpoints and no corpus to project them "
                               f"from; give --words-per-epoch {run}=N (e.g. {run}=50000000)")
        projected[run] = projected_checkpoints(cfg, run, words)
        said.append(f"{run} {words:,} words/epoch")
    return projected, "projected from the schedule (" + ", ".join(said) + ")"


def best_text_stand_in(cfg: Config, runs: Checkpoints) -> dict[Path, Path]:
    """The best text checkpoint is known once every one is scored (`vlmerge sweep plan` does it):
    the estimate pairs each multimodal checkpoint with the text run's last (the cost is the same)."""
    last = all_checkpoints(cfg, "text", runs)[-1]
    return {m: last for m in run_checkpoints(cfg, "multimodal", runs)}


# -- calibration ----------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskCost:
    task: str
    items: int  # in the data (or --items)
    sampled: int
    prepare_s: float  # tokenising and batching the sample
    score_s: float  # scoring the sample, warm
    bytes: int  # the sample's batches in memory

    def scale(self, seconds: float) -> float:
        return seconds * self.items / self.sampled


@dataclasses.dataclass
class Calibration:
    device: str
    model: str  # the directory calibrated with
    import_s: float
    setup_s: float  # the features and the tasks' data
    load_s: float
    merge_s: dict[str, float]  # method -> one α, warm
    first_merge_s: dict[str, float]  # method -> its first α on an item (whole-model statistics)
    distances_s: float
    probe_s: float  # the probe's signals of one model (0: the probe off)
    tasks: list[TaskCost]
    peak_rss: int
    peak_gpu: int
    metric_rows: int  # per model
    item_rows: float  # per model
    metric_row_bytes: float
    item_row_bytes: float
    export_bytes: float  # BabyLM prediction files per exported model

    @property
    def score_s(self) -> float:
        """Scoring every item of every task once: one model."""
        return sum(t.scale(t.score_s) for t in self.tasks)

    @property
    def prepare_s(self) -> float:
        return sum(t.scale(t.prepare_s) for t in self.tasks)


def import_seconds() -> float:
    """A sweep worker's imports, timed in a fresh interpreter (this process has them already)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vlmerge.sweep.run, vlmerge.model"], check=True)
    return time.perf_counter() - t0


def sample_of(task: PreparedTask, n: int) -> PreparedTask:
    """`n` items spread evenly over the task (its order is the file's: lengths vary along it)."""
    if len(task.items) <= n:
        return task
    keep = np.linspace(0, len(task.items) - 1, n).round().astype(int)
    items = [task.items[i] for i in keep]
    return PreparedTask(task.task, items, task.task.requests(items), task.dataset)


@contextlib.contextmanager
def calibration_model(cfg: Config, given: Path | None, items: Sequence[WorkItem]) -> Iterator[Path]:
    """The checkpoint to calibrate with: `given`, the plan's first trained checkpoint, or an untrained
    model of `model.*` (the experiment's tokenizer and features) in a temp folder."""
    if given is not None:
        yield given
        return
    trained = [cfg.root / it.text for it in items if (cfg.root / it.text / "config.json").is_file()]
    if trained:
        yield trained[0]
        return
    from vlmerge.model import build_config, copy_tokenizer_files, init_model
    from vlmerge.precompute.tokenizer import load_tokenizer

    if not (cfg.layout.tokenizer_dir / "tokenizer.json").is_file():
        raise VlmergeError("sweep plan --estimate: nothing to calibrate with: no trained checkpoint and no tokenizer "
                           f"in {cfg.layout.tokenizer_dir}; build the tokenizer and features, or give "
                           "--calibrate-with a model directory of the same architecture")
    tokenizer = load_tokenizer(cfg.layout.tokenizer_dir, cfg.tokenizer)
    features = FeatureTable(cfg.store_path)
    config = build_config(cfg.model, tokenizer, features.dim, cfg.features.layer, image_tokens=features.tokens)
    with tempfile.TemporaryDirectory(prefix="vlmerge-estimate-") as tmp:
        init_model(config, cfg.model.init_seed).save_pretrained(tmp)
        copy_tokenizer_files(cfg.layout.tokenizer_dir, Path(tmp))
        yield Path(tmp)


def parquet_bytes_per_row(rows: list[dict], schema) -> float:
    if not rows:
        return 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows"
        write_rows(rows, schema, path)
        return path.stat().st_size / len(rows)


def calibrate(cfg: Config, model_dir: Path, methods: Sequence[str], sample: int | None,
              counts: Mapping[str, int]) -> Calibration:
    """Time one item's work on a sample of each task (see the module's docstring)."""
    device = resolve_device(cfg.compute.device)
    n = sample or SAMPLE.get(device.type, SAMPLE["cpu"])
    imports = import_seconds()
    t0 = time.perf_counter()
    features = FeatureTable(cfg.eval_store_path)
    tasks = prepare(task_specs(cfg, sweep_tasks(cfg)), features, ProblemLog())
    setup = time.perf_counter() - t0

    t0 = time.perf_counter()
    pair = Pair.open(model_dir, model_dir, model_dir)
    specs = {n: shape for n, (dtype, shape) in pair.text.specs.items() if dtype.is_floating_point}
    for name in {s for m in methods for s in get_method(m).statistics}:
        stand_in = STATISTICS.lookup(name).stand_in(specs)
        pair.statistics[name] = (stand_in, stand_in)
    merger = PairMerger(pair, allow_extrapolation=True, device=device)
    model, tokenizer = load_model(model_dir, device)
    scorer = config_scorer(cfg, model, tokenizer, features)
    load = time.perf_counter() - t0

    first, warm = {}, {}
    for method in methods:
        for timings, alpha in ((first, 0.5), (warm, 0.25)):
            t0 = time.perf_counter()
            merger.merge_into(model, method, alpha)
            _sync(device)
            timings[method] = time.perf_counter() - t0
    probe = 0.0
    if probing(cfg):
        t0 = time.perf_counter()
        probe_set = ProbeSet.load(cfg)
        setup += time.perf_counter() - t0
        signals(model, probe_set, str(model_dir))  # warm
        _sync(device)
        t0 = time.perf_counter()
        signals(model, probe_set, str(model_dir))
        _sync(device)
        probe = time.perf_counter() - t0
    distances = 0.0  # sweep.distances off: none to time (at width 768 on a CPU, a minute)
    if cfg.sweep.distances:
        t0 = time.perf_counter()
        distance_rows(pair.text, pair.mm, pair.base, device=device)
        distances = time.perf_counter() - t0

    costs, results = [], []
    for task in tasks:
        (part,) = fitting(scorer, [sample_of(task, n)], ProblemLog())  # as the sweep leaves out the too long
        t0 = time.perf_counter()
        prepared = scorer.prepare(part.requests)
        prepare_s = time.perf_counter() - t0
        scorer.score(prepared)  # warm: kernels chosen, caches and allocator filled
        _sync(device)
        t0 = time.perf_counter()
        scorer.score(prepared)
        _sync(device)
        score_s = time.perf_counter() - t0
        size = sum(t.numel() * t.element_size() for b in prepared.batches for t in dataclasses.astuple(b)
                   if isinstance(t, torch.Tensor))
        costs.append(TaskCost(task.task.name, counts.get(task.task.name, len(task.items)), len(part.items),
                              prepare_s, score_s, size))
        (result,) = evaluate(scorer, [part], str(model_dir))
        results.append((result, costs[-1].items / costs[-1].sampled))
    rows, items = result_rows(ModelKey.of_directory(model_dir), [r for r, _ in results])
    item_rows = sum(len(r.items) * scale for r, scale in results)
    exports = sum(len(json.dumps(content)) * scale for (r, scale) in results
                  for content in babylm_files([r]).values())
    return Calibration(
        device=_device_name(device), model=str(model_dir), import_s=imports, setup_s=setup, load_s=load,
        merge_s=warm, first_merge_s=first, distances_s=distances, probe_s=probe, tasks=costs,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_gpu=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        metric_rows=len(rows), item_rows=item_rows, metric_row_bytes=parquet_bytes_per_row(rows, RESULTS_SCHEMA),
        item_row_bytes=parquet_bytes_per_row(items, ITEMS_SCHEMA), export_bytes=exports)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


# -- the estimate ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
    """Seconds of each array task, and what the whole sweep takes."""

    items: int
    merged_models: int
    endpoints: int
    pairs: int
    task_seconds: list[float]
    one_process_seconds: float  # every item in one process (`vlmerge sweep run` outside an array)
    best_text_seconds: float  # pairing best_text: scoring both twins' checkpoints first, before the array
    peak_rss: int
    peak_gpu: int
    results_bytes: float
    export_bytes: float

    @property
    def total_seconds(self) -> float:
        return sum(self.task_seconds)

    def as_json(self) -> dict:
        return dataclasses.asdict(self) | {"total_seconds": self.total_seconds}


def item_seconds(item: WorkItem, cal: Calibration, scored_share: float = 1.0) -> float:
    """One item's own work: its pair loaded, the tasks tokenised, each α merged, probed (cal.probe_s) and
    scored; `scored_share` < 1 (the adaptive search): that share of the α, rounded up, merged again and scored."""
    alphas = max(len(item.alphas), 1)
    scored = alphas if scored_share >= 1 else math.ceil(scored_share * alphas)
    method = "linear" if is_expert_method(item.method) else item.method  # (expert merges: as linear)
    merge_first = cal.first_merge_s.get(method, 0.0)
    merge = cal.merge_s.get(method, 0.0)
    merges = alphas - 1 + (scored if scored_share < 1 else 0)
    return cal.load_s + cal.prepare_s + merge_first + merges * merge + alphas * cal.probe_s + scored * cal.score_s


def array_seconds(cfg: Config, todo: Sequence[WorkItem], cal: Calibration,
                  per_task: int) -> tuple[list[float], set[str], set[tuple]]:
    """Seconds of each array task of `per_task` items: its start, its items, and the endpoints and
    distances its items are the first to need; with the endpoints and pairs of distances counted."""
    start = cal.import_s + cal.setup_s
    endpoints, pairs, tasks = set(), set(), []
    for k in range(0, len(todo), per_task):
        seconds = start
        for it in todo[k : k + per_task]:
            adaptive = cfg.sweep.search == "adaptive" and len(it.alphas) > 2 and not is_expert_method(it.method)
            seconds += item_seconds(it, cal, cfg.sweep.search_budget if adaptive else 1.0)
            for rel in {it.text, it.mm}:
                name = endpoint_id(it, rel)
                if name not in endpoints and not finished(cfg, name):
                    endpoints.add(name)
                    seconds += cal.merge_s.get("linear", 0.0) + cal.score_s + cal.probe_s
            pair = (it.text, it.mm, it.base)
            if cfg.sweep.distances and pair not in pairs:
                pairs.add(pair)
                seconds += cal.distances_s
        tasks.append(seconds)
    return tasks, endpoints, pairs


def best_text_items(cfg: Config) -> int:
    """Pairing best_text: the items of the data that picks the text checkpoint (read before any
    calibrating: a missing file stops the estimate at once); 0 without that pairing."""
    if cfg.sweep.pairing != "best_text":
        return 0
    name, data = best_text_data(cfg)
    if name not in sweep_tasks(cfg):
        raise VlmergeError(f"sweep plan --estimate: pairing best_text scores the checkpoints on {name}, which "
                           "is not among the sweep's tasks to calibrate on")
    return len(get_task(name).load(Path(data), ProblemLog()))


def best_text_seconds(cfg: Config, cal: Calibration, runs: Checkpoints, items: int) -> float:
    """Pairing best_text: every checkpoint of both twins scored on `items` of sweep.best_text_task
    before the plan exists (jobs/pipeline.sh's best-text job), less those whose scores are kept."""
    if cfg.sweep.pairing != "best_text":
        return 0.0
    name, _ = best_text_data(cfg)
    cache = best_text_cache(cfg.layout.results_dir)
    kept = read_json(cache) if cache.is_file() else {}
    scored = kept["accuracy"] if kept.get("salt") == best_text_salt(cfg) else {}
    todo = sum(str(c.relative_to(cfg.root)) not in scored.get(run, {})
               for run in BEST_TEXT_RUNS for c in run_checkpoints(cfg, run, runs))
    if not todo:
        return 0.0
    # its own data (e.g. the full BLiMP beside the sweep's fast one), priced at the sample's rate per item
    task = next(t for t in cal.tasks if t.task == name)
    return todo * (cal.load_s + (task.prepare_s + task.score_s) * items / task.sampled)


def estimate(cfg: Config, items: Sequence[WorkItem], cal: Calibration, per_task: int,
             runs: Checkpoints = None, best_text_items: int = 0) -> Estimate:
    """The cost of the items not done yet, as an array of `per_task` items per task."""
    todo = [it for it in items if not finished(cfg, it.item_id)]
    tasks, seen_endpoints, seen_pairs = array_seconds(cfg, todo, cal, per_task)
    one_process = sum(array_seconds(cfg, todo, cal, max(len(todo), 1))[0])
    models = sum(max(len(it.alphas), 1) for it in todo)
    exported = sum(1 for it in todo for a in it.alphas for spec in cfg.sweep.export_babylm
                   if spec.selects(it.method, json.loads(it.params), a,
                                   checkpoint_words(Path(it.mm)) if it.mm else 0))
    rows = (models + len(seen_endpoints)) * (cal.metric_rows * cal.metric_row_bytes + cal.item_rows * cal.item_row_bytes)
    prepared = sum(t.scale(t.bytes) for t in cal.tasks)
    return Estimate(len(todo), models, len(seen_endpoints), len(seen_pairs), tasks, one_process,
                    best_text_seconds(cfg, cal, runs, best_text_items), int(cal.peak_rss + prepared), cal.peak_gpu, rows,
                    exported * cal.export_bytes)


# -- the report ------------------------------------------------------------------------------------

def hours(seconds: float) -> str:
    """A duration in the unit that reads best: s, min or h."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def report(cal: Calibration, est: Estimate, *, plan_source: str, array: tuple[int, int], max_array_size: int,
           time_limit: tuple[str, float | None] | None) -> list[str]:
    """The estimate as lines of text, warnings last."""
    tasks, per_task = array
    longest = max(est.task_seconds, default=0.0)
    lines = [
        f"sweep estimate on {cal.device}, calibrated with {cal.model}",
        f"  plan: {est.items} item(s) to run ({plan_source}): {est.merged_models} merged models, "
        f"{est.endpoints} unmerged checkpoints, {est.pairs} pair(s) of distances",
        f"  {'task':<20} {'items':>9} {'sample':>7} {'s/1k items':>11} {'per model':>10}",
    ]
    for t in cal.tasks:
        lines.append(f"  {t.task:<20} {t.items:>9,} {t.sampled:>7} {1000 * t.score_s / t.sampled:>11.3f} "
                     f"{hours(t.scale(t.score_s)):>10}")
    merges = ", ".join(f"{m} {s:.3f} s" for m, s in cal.merge_s.items())
    lines += [
        f"  one model scored: {hours(cal.score_s)}; tokenising the tasks: {cal.prepare_s:.1f} s per item; "
        f"merge per α: {merges}; load {cal.load_s:.1f} s; distances {cal.distances_s:.1f} s"
        + (f"; probe {cal.probe_s:.3f} s per model" if cal.probe_s else ""),
        f"  worker start: imports {cal.import_s:.1f} s, features and task data {cal.setup_s:.1f} s",
        f"  array: {tasks} task(s) × {per_task} item(s); per task {hours(longest)} at most, "
        f"{hours(est.total_seconds / max(len(est.task_seconds), 1))} on average; "
        f"total {est.total_seconds / 3600:.2f} worker-hours; "
        f"in one process (sweep run, no array): {hours(est.one_process_seconds)}",
        *([f"  before the array: pairing best_text scores every checkpoint of both twins first (pipeline.sh's "
           f"best-text job): {hours(est.best_text_seconds)}"] if est.best_text_seconds else []),
        f"  peak memory of a worker: {est.peak_rss / GIB:.2f} GiB RSS"
        + (f", {est.peak_gpu / GIB:.2f} GiB on the GPU" if est.peak_gpu else ""),
        f"  disk: results {est.results_bytes / 2**20:.1f} MiB, BabyLM exports {est.export_bytes / 2**20:.1f} MiB",
    ]
    if per_task > 1:
        lines.append(f"  warning: {est.items} items exceed MaxArraySize {max_array_size}: {per_task} items per array task")
    if time_limit is not None:
        partition, limit = time_limit
        if limit is not None and longest > limit:
            lines.append(f"  warning: an array task needs about {hours(longest)}, more than partition {partition}'s "
                         f"time limit of {hours(limit)}: give the tasks more GPUs/CPUs or fewer items each")
    lines.append(f"  submit with --time={_slurm_time(1.3 * longest)} or more (the estimate + 30%)")
    return lines


def _slurm_time(seconds: float) -> str:
    minutes = max(1, int(np.ceil(seconds / 60)))
    return f"{minutes // 1440}-{minutes // 60 % 24:02d}:{minutes % 60:02d}:00"


def counts_arg(values: Sequence[str], flag: str) -> dict[str, int]:
    """`NAME=N` values of a repeatable option (`--words-per-epoch text=5e7`, `--items blimp=59875`)."""
    out = {}
    for value in values:
        name, _, number = value.partition("=")
        try:
            out[name] = int(float(number))
        except ValueError:
            raise VlmergeError(f"{flag} {value!r}: expected NAME=N, e.g. {flag} text=50000000") from None
    return out


def estimate_command(cfg: Config, *, words_per_epoch: Mapping[str, int], counts: Mapping[str, int],
                     calibrate_with: Path | None, sample: int | None, max_array_size: int,
                     time_limit: tuple[str, float | None] | None, as_json: bool) -> Estimate:
    """Plan (or project) the sweep, calibrate, and print its cost."""
    runs, source = checkpoints_of(cfg, words_per_epoch)
    best_text = best_text_stand_in(cfg, runs) if cfg.sweep.pairing == "best_text" else None
    items = plan(cfg, best_text, runs)
    methods = sorted({"linear" if is_expert_method(it.method) else it.method for it in items})
    picking = best_text_items(cfg)
    with calibration_model(cfg, calibrate_with, items) as model_dir:
        cal = calibrate(cfg, model_dir, methods, sample, counts)
    layout = array_layout(len([it for it in items if not finished(cfg, it.item_id)]) or 1, max_array_size)
    est = estimate(cfg, items, cal, layout[1], runs, picking)
    if as_json:
        print(json.dumps({"calibration": dataclasses.asdict(cal), "estimate": est.as_json(), "array": layout}, indent=1))
    else:
        print("\n".join(report(cal, est, plan_source=source, array=layout, max_array_size=max_array_size,
                               time_limit=time_limit)))
    return est
