"""Run work items: load a pair once, merge at every α in memory, evaluate, write results atomically.

    metrics/<item>    one row per (α, task, subtask, metric) of the item
    items/<item>      per-example scores (for bootstrap intervals)
    metrics/, items/ of an endpoint: an unmerged twin (method none), once per checkpoint
    distances/<key>   the pair's weight distances, once per pair
(files of `results/<exp>/`, named by `vlmerge.layout`)

An item whose metrics file exists is done (that file is written last); a killed item leaves
no file and runs again from the start.

With the probe on (`sweep.probe`, or `sweep.search: adaptive`) every model scored, twin or merge,
also gets the probe's signals as rows of the task `probe`. The adaptive search probes every α of
a pair's grid, and evaluates in full only those `vlmerge.predict` picks; the others keep their
probe rows only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from vlmerge.config import Config
from vlmerge.data import FeatureTable
from vlmerge.device import resolve_device
from vlmerge.evaluate.run import (PreparedTask, TaskResult, config_scorer, evaluate, export_babylm, fitting, load_model,
                                  load_tokenizer, prepare, result_rows, task_specs)
from vlmerge.evaluate.probe import ProbeSet, probe_result, signals
from vlmerge.evaluate.scoring import Scorer
from vlmerge.io import fingerprint, read_json, remove_stale_temps, write_json
from vlmerge.merge.core import Pair, PairMerger
from vlmerge.merge.distance import distance_rows, write_parquet
from vlmerge.merge.experts import ExpertMerger, expert_distance_rows, expert_method, is_expert_method
from vlmerge.merge.statistics import write_statistics
from vlmerge.merge.methods import get_method
from vlmerge.predict import Predictor, first_alphas, next_alphas, targets
from vlmerge.problems import ProblemLog
from vlmerge.layout import (RESULT_DATASETS, babylm_export_dir, babylm_exports_root, best_text_cache,
                            checkpoint_words, endpoint_name, result_dataset_dir, result_file)
from vlmerge.results import (ITEMS_SCHEMA, MM_ALPHA, RESULTS_SCHEMA, TEXT_ALPHA, UNMERGED, ModelKey, checkpoint_run,
                             compacted_item_ids, read_results, write_rows)
from vlmerge.sweep.plan import (BEST_TEXT_RUNS, WorkItem, best_text_data, best_text_salt, probing, run_checkpoints,
                                sweep_tasks)


def open_pair(cfg: Config, method: str, text: Path, mm: Path, base: Path | None) -> Pair:
    """The twins (and base) to merge with `method`, with the data statistics it needs, computed first
    where missing."""
    names = get_method(method).statistics
    for ckpt in (text, mm):
        write_statistics(cfg, ckpt, names)
    return Pair.open(text, mm, base, statistics=names)


def open_experts(cfg: Config, method: str, checkpoint: Path, seed: Path, device) -> ExpertMerger:
    """An expert checkpoint to merge with `method` on `device`, its data statistics computed first where missing."""
    write_statistics(cfg, checkpoint, expert_method(method).statistics)
    return ExpertMerger(checkpoint, method, seed, device=device)


def metrics_path(cfg: Config, name: str) -> Path:
    return result_file(cfg.layout.results_dir, "metrics", name)


def items_path(cfg: Config, name: str) -> Path:
    return result_file(cfg.layout.results_dir, "items", name)


def finished(cfg: Config, name: str) -> bool:
    """Whether the results of `name` (a work item or an endpoint) are written, compacted or not."""
    return metrics_path(cfg, name).is_file() or name in compacted_item_ids(cfg.layout.results_dir)


def is_done(cfg: Config, item: WorkItem) -> bool:
    return finished(cfg, item.item_id)


def endpoint_id(item: WorkItem, rel: str) -> str:
    """The results name of an unmerged twin (`rel`: its checkpoint) as scored for `item`'s tasks."""
    return endpoint_name(fingerprint([rel, item.salt])[:12])


def merge_name(item: WorkItem, alpha: float | None) -> str:
    """A merge of the item at α, in words (for errors)."""
    at = "" if alpha is None else f" at α {alpha:g}"
    return f"the {item.method} merge{at} of {item.text} and {item.mm}"


def result_ids(items: list[WorkItem]) -> set[str]:
    """Every results name the sweep of `items` writes: the items and their unmerged twins."""
    return {item.item_id for item in items} | {endpoint_id(item, rel) for item in items for rel in (item.text, item.mm)}


@dataclasses.dataclass
class Timing:
    """Seconds spent per phase of one item (the benchmark reports them per α)."""

    load: float = 0.0
    merge: float = 0.0
    evaluate: float = 0.0
    alphas: int = 0  # evaluated in full
    probe: float = 0.0
    probed: int = 0

    def line(self) -> str:
        per = max(self.alphas, 1)
        probe = f", probe {self.probe / self.probed:.2f}s ({self.probed} α)" if self.probed else ""
        return (f"load {self.load:.2f}s, per α: merge {self.merge / per:.3f}s, "
                f"evaluate {self.evaluate / per:.2f}s ({self.alphas} α){probe}")


class ItemRunner:
    """Runs items on one process and its device (compute.device), reusing the feature table and the
    prepared tasks across items."""

    def __init__(self, cfg: Config, progress: bool = False, job_id: str = ""):
        self.cfg, self.progress, self.job_id = cfg, progress, job_id
        self.device = resolve_device(cfg.compute.device)
        self.features = FeatureTable(cfg.eval_store_path)
        problems = ProblemLog()
        self.tasks = prepare(task_specs(cfg, sweep_tasks(cfg)), self.features, problems)
        problems.report("sweep tasks")
        self.probe = ProbeSet.load(cfg) if probing(cfg) else None
        self._predictor: Predictor | None = None  # fitted once per process (adaptive search)
        # the tasks without the items too long for a scorer's model, for the last scorer (weakly: not kept alive)
        self._tasks_for: tuple[weakref.ref, list[PreparedTask]] | None = None

    def evaluate(self, scorer: Scorer, model: str) -> list[TaskResult]:
        """The tasks scored by `scorer`'s model as it is now; the items too long for it are left out and
        reported once per scorer."""
        if self._tasks_for is None or self._tasks_for[0]() is not scorer:
            problems = ProblemLog()
            self._tasks_for = weakref.ref(scorer), fitting(scorer, self.tasks, problems)
            problems.report(f"sweep tasks for {model}")
        return evaluate(scorer, self._tasks_for[1], model)

    def run(self, item: WorkItem) -> Timing | None:
        """Run one item unless it is done; returns its timing (None when skipped)."""
        if is_done(self.cfg, item):
            return None
        run = (self._run_plain if item.method == UNMERGED else
               self._run_experts if is_expert_method(item.method) else self._run_pair)
        return run(item, Timing())

    def _run_plain(self, item: WorkItem, timing: Timing) -> Timing:
        """One checkpoint scored as it is (method none: nothing merged)."""
        t0, ckpt = time.perf_counter(), self.cfg.root / item.text
        model, tokenizer = load_model(ckpt, self.device)
        timing.load = time.perf_counter() - t0
        t = time.perf_counter()
        self._write_endpoint(item.item_id, ckpt, config_scorer(self.cfg, model, tokenizer, self.features), item.study)
        timing.evaluate, timing.alphas = time.perf_counter() - t, 1
        return timing

    def _run_pair(self, item: WorkItem, timing: Timing) -> Timing:
        t0, root = time.perf_counter(), self.cfg.root
        text, mm = root / item.text, root / item.mm
        pair = open_pair(self.cfg, item.method, text, mm, root / item.base if item.base else None)
        merger = PairMerger(pair, allow_extrapolation=self.cfg.sweep.allow_extrapolation, device=self.device)
        model, tokenizer = load_model(text, self.device)
        scorer = config_scorer(self.cfg, model, tokenizer, self.features)
        timing.load = time.perf_counter() - t0

        self._endpoints(item, merger, model, scorer)
        self._distances(item, lambda: distance_rows(pair.text, pair.mm, pair.base, device=self.device))
        key = ModelKey.of_pair(checkpoint_run(text), checkpoint_run(mm), item.method, item.params, item.study)
        params = json.loads(item.params)
        return self._merges(item, model, scorer, key, lambda a: merger.merge_into(model, item.method, a, params),
                            timing, adaptive=self.cfg.sweep.search == "adaptive" and len(item.alphas) > 2)

    def _run_experts(self, item: WorkItem, timing: Timing) -> Timing:
        """An expert checkpoint merged into the plain model at every setting (α: the vision
        expert's weight); the unmerged expert model (MSA) is its endpoint."""
        t0 = time.perf_counter()
        ckpt, seed = self.cfg.root / item.text, self.cfg.root / item.base
        merger = open_experts(self.cfg, item.method, ckpt, seed, self.device)
        model, tokenizer = merger.plain_model().to(self.device), load_tokenizer(ckpt)
        scorer = config_scorer(self.cfg, model, tokenizer, self.features)
        timing.load = time.perf_counter() - t0

        name = endpoint_id(item, item.text)
        if not finished(self.cfg, name):
            msa, _ = load_model(ckpt, self.device)
            self._write_endpoint(name, ckpt, config_scorer(self.cfg, msa, tokenizer, self.features), item.study)
        self._distances(item, lambda: expert_distance_rows(ckpt, seed, device=self.device))
        key = ModelKey.of_pair(*[checkpoint_run(ckpt)] * 2, item.method, item.params, item.study)
        params = json.loads(item.params)
        return self._merges(item, model, scorer, key, lambda a: merger.merge_into(model, a, params), timing)

    def _merges(self, item: WorkItem, model, scorer: Scorer, key: ModelKey, merge_at: Callable[[float | None], None],
                timing: Timing, adaptive: bool = False) -> Timing:
        """Merge at each α of the item (once, α None, for a method without one), score, write the rows;
        `adaptive`: probe every α, and evaluate those the search picks."""
        rows, items = [], []

        def at(alpha: float | None, *, full: bool) -> list[dict]:
            """The rows of the merge at α: the tasks (full) or the probe alone."""
            t = time.perf_counter()
            merge_at(alpha)
            timing.merge += time.perf_counter() - t
            t = time.perf_counter()
            if full:
                results = self.evaluate(scorer, merge_name(item, alpha))
                if alpha is not None:
                    self._export(item, alpha, key.mm_words, results)
                timing.evaluate += time.perf_counter() - t
                timing.alphas += 1
            if self.probe is not None and (not full or not adaptive):  # an adaptive item probed every α first
                t = time.perf_counter()
                values = signals(model, self.probe, merge_name(item, alpha))
                results = (results if full else []) + [probe_result(values, self.probe)]
                timing.probe += time.perf_counter() - t
                timing.probed += 1
            r, i = result_rows(dataclasses.replace(key, alpha=alpha), results,
                               item_id=item.item_id, config_hash=self.cfg.hash(), job_id=self.job_id)
            rows.extend(r)
            items.extend(i)
            return r

        if adaptive:
            self._search(item, lambda a: at(a, full=False), lambda a: at(a, full=True))
        else:
            for alpha in item.alphas or (None,):
                at(alpha, full=True)
        write_rows(items, ITEMS_SCHEMA, items_path(self.cfg, item.item_id))
        write_rows(rows, RESULTS_SCHEMA, metrics_path(self.cfg, item.item_id))  # last: marks the item done
        return timing

    def _search(self, item: WorkItem, probe_at: Callable[[float], list[dict]],
                evaluate_at: Callable[[float], list[dict]]) -> None:
        """The adaptive search of the item's grid (vlmerge.predict): probe every α, evaluate the predicted
        best and its neighbours, refine."""
        grid = sorted(item.alphas)
        predictor = self._fitted(item)
        twins = tuple(self._endpoint_rows(item, [rel])[0] for rel in (item.text, item.mm))
        predicted = {a: predictor.predicted(probe_at(a), twins) for a in grid}
        tolerance, measured = self.cfg.analysis.tolerance, {}
        todo = first_alphas(grid, predicted, tolerance)
        while todo:
            for a in todo:
                measured[a] = predictor.measured(evaluate_at(a), twins)
            todo = next_alphas(grid, measured, predicted, tolerance, self.cfg.sweep.search_budget)

    def _fitted(self, item: WorkItem) -> Predictor:
        """The predictor, fitted on the twins of every checkpoint of both runs (each scored and probed
        first where it is not yet): the same calibration for every item of the sweep."""
        if self._predictor is None:
            rels = [str(c.relative_to(self.cfg.root)) for run in BEST_TEXT_RUNS for c in run_checkpoints(self.cfg, run)]
            for rel in rels:
                name = endpoint_id(item, rel)
                if not finished(self.cfg, name):
                    model, tokenizer = load_model(self.cfg.root / rel, self.device)
                    self._write_endpoint(name, self.cfg.root / rel, config_scorer(self.cfg, model, tokenizer,
                                                                                 self.features), item.study)
            self._predictor = Predictor.fitted(*targets(self.cfg), self._endpoint_rows(item, rels))
        return self._predictor

    def _endpoint_rows(self, item: WorkItem, rels: list[str]) -> list[list[dict]]:
        """The result rows of the twins of these checkpoints (written, compacted or not)."""
        names = [endpoint_id(item, rel) for rel in rels]
        rows = read_results(self.cfg.layout.results_dir)
        rows = rows[rows.item_id.isin(names)]
        return [rows[rows.item_id == n].to_dict("records") for n in names]

    def _endpoints(self, item: WorkItem, merger: PairMerger, model, scorer: Scorer) -> None:
        """Each unmerged twin, evaluated once per checkpoint (linear at the twin's α is that twin,
        bitwise, so the pair already in memory serves)."""
        for rel, alpha in ((item.text, TEXT_ALPHA), (item.mm, MM_ALPHA)):
            name = endpoint_id(item, rel)
            if not finished(self.cfg, name):
                merger.merge_into(model, "linear", alpha)
                self._write_endpoint(name, self.cfg.root / rel, scorer, item.study)

    def _write_endpoint(self, name: str, checkpoint: Path, scorer: Scorer, study: str) -> None:
        """The scores of the unmerged model of `checkpoint`, which `scorer` holds."""
        key = ModelKey.twin(checkpoint_run(checkpoint), study)
        results = self.evaluate(scorer, str(checkpoint))
        if self.probe is not None:
            results.append(probe_result(signals(scorer.model, self.probe, str(checkpoint)), self.probe))
        rows, items = result_rows(key, results, item_id=name, config_hash=self.cfg.hash(), job_id=self.job_id)
        write_rows(items, ITEMS_SCHEMA, items_path(self.cfg, name))
        write_rows(rows, RESULTS_SCHEMA, metrics_path(self.cfg, name))

    def _export(self, item: WorkItem, alpha: float, words: int, results: list[TaskResult]) -> None:
        """BabyLM's prediction files of a merge that sweep.export_babylm selects (before the item's
        metrics file: a killed item writes them again)."""
        params = json.loads(item.params)
        if any(spec.selects(item.method, params, alpha, words) for spec in self.cfg.sweep.export_babylm):
            export_babylm(results, babylm_export_dir(self.cfg.layout.results_dir, item.method, params, alpha, words))

    def _distances(self, item: WorkItem, rows: Callable[[], pd.DataFrame]) -> None:
        """The distances of the item's inputs, once for all items of the same inputs."""
        if not self.cfg.sweep.distances:
            return
        out = result_file(self.cfg.layout.results_dir, "distances", fingerprint([item.text, item.mm, item.base])[:12])
        if not out.is_file():
            write_parquet(rows(), out, item.study)


def run_items(cfg: Config, items: list[WorkItem], *, progress: bool = False, job_id: str = "") -> int:
    """Run every item not done yet, in order; returns how many ran (job_id: recorded in the rows)."""
    # What earlier array tasks left when killed mid-write (live writers' temp files stay).
    exports = babylm_exports_root(cfg.layout.results_dir)
    remove_stale_temps(*(result_dataset_dir(cfg.layout.results_dir, d) for d in RESULT_DATASETS),
                       *(p for p in exports.rglob("*") if p.is_dir()))
    runner = ItemRunner(cfg, progress, job_id)
    ran = 0
    for k, item in enumerate(items):
        timing = runner.run(item)
        status = "done already" if timing is None else timing.line()
        print(f"sweep item {k + 1}/{len(items)} {item.item_id} ({item.method}, {Path(item.mm).name}): {status}",
              file=sys.stderr if timing is None else sys.stdout)
        ran += timing is not None
    return ran


def kept_best_text(cfg: Config) -> tuple[dict, list[tuple[str, Path]]]:
    """The best-text scores kept in results/<exp>/best_text.json (a fresh record where there are none
    of these settings), and the (run, checkpoint) not scored yet."""
    cache = best_text_cache(cfg.layout.results_dir)
    task, data = best_text_data(cfg)
    salt = best_text_salt(cfg)
    kept = read_json(cache) if cache.is_file() else {}
    scores = kept if kept.get("salt") == salt else {"salt": salt, "task": task, "data": data,
                                                     "accuracy": {run: {} for run in BEST_TEXT_RUNS}}
    todo = [(run, c) for run in BEST_TEXT_RUNS for c in run_checkpoints(cfg, run)
            if str(c.relative_to(cfg.root)) not in scores["accuracy"][run]]
    return scores, todo


def best_text_scores(cfg: Config) -> dict:
    """Every checkpoint of both twins scored on sweep.best_text_task (on sweep.best_text_data, or its
    eval.tasks data), kept in results/<exp>/best_text.json: {"salt", "task", "data", "accuracy":
    {run: {checkpoint: {"words", "accuracy"}}}}. The text twin's pick the pairing; both twins' are
    Takmaz et al.'s Fig. 3. Checkpoints scored already are kept (a killed job, or training that went on)."""
    cache = best_text_cache(cfg.layout.results_dir)
    task, data = best_text_data(cfg)
    scores, todo = kept_best_text(cfg)
    if todo:
        features = FeatureTable(cfg.eval_store_path)
        tasks = prepare(task_specs(cfg, [f"{task}={data}"]), features, ProblemLog())
        device = resolve_device(cfg.compute.device)
    for run, ckpt in todo:
        model, tokenizer = load_model(ckpt, device)
        scorer = config_scorer(cfg, model, tokenizer, features)
        (result,) = evaluate(scorer, fitting(scorer, tasks, ProblemLog()), str(ckpt))
        acc = next(m.value for m in result.metrics if m.subtask == "" and m.metric == "accuracy")
        scores["accuracy"][run][str(ckpt.relative_to(cfg.root))] = {"words": checkpoint_words(ckpt), "accuracy": acc}
        write_json(cache, scores)  # after each checkpoint: a killed job keeps what it scored
        print(f"best text: {run} {ckpt.name}: {task} accuracy {acc:.4f} ({len(todo)} checkpoint(s) to score)")
    return scores


def best_text_pairing(cfg: Config) -> dict[Path, Path]:
    """Every multimodal checkpoint -> the text checkpoint with the best accuracy of best_text_scores
    (the paper's pairing)."""
    text = best_text_scores(cfg)["accuracy"]["text"]
    best = cfg.root / max(text, key=lambda c: text[c]["accuracy"])
    return {m: best for m in run_checkpoints(cfg, "multimodal")}
