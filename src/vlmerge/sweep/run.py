"""Run work items: load a pair once, merge at every α in memory, evaluate, write results atomically.

    results/<exp>/metrics/<item>.parquet          one row per (α, task, subtask, metric) of the item
    results/<exp>/items/<item>.parquet            per-example scores (for bootstrap intervals)
    results/<exp>/metrics/endpoint-<key>.parquet  an unmerged twin (method none), once per checkpoint
    results/<exp>/distances/<key>.parquet         the pair's weight distances, once per pair

An item whose metrics file exists is done (that file is written last); a killed item leaves
no file and runs again from the start.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from precompute.features import store_path
from vlmerge.config import Config
from vlmerge.data import FeatureTable
from vlmerge.evaluate.run import evaluate, load_model, prepare, result_rows, task_specs
from vlmerge.evaluate.scoring import Scorer
from vlmerge.io import fingerprint, read_json, write_json
from vlmerge.merge.core import Pair, PairMerger
from vlmerge.merge.distance import distance_rows, write_parquet
from vlmerge.merge.grams import write_grams
from vlmerge.merge.methods import get_method
from vlmerge.problems import ProblemLog
from vlmerge.results import ITEMS_SCHEMA, RESULTS_SCHEMA, ModelInfo, checkpoint_run, compacted_item_ids, write_rows
from vlmerge.sweep.plan import WorkItem, eval_salt, run_checkpoints, sweep_tasks


def metrics_path(cfg: Config, name: str) -> Path:
    return cfg.results_dir / "metrics" / f"{name}.parquet"


def items_path(cfg: Config, name: str) -> Path:
    return cfg.results_dir / "items" / f"{name}.parquet"


def finished(cfg: Config, name: str) -> bool:
    """Whether the results of `name` (a work item or an endpoint) are written, compacted or not."""
    path = metrics_path(cfg, name)
    return path.is_file() or name in compacted_item_ids(path.parent)


def is_done(cfg: Config, item: WorkItem) -> bool:
    return finished(cfg, item.item_id)


@dataclasses.dataclass
class Timing:
    """Seconds spent per phase of one item (the benchmark reports them per α)."""

    load: float = 0.0
    merge: float = 0.0
    evaluate: float = 0.0
    alphas: int = 0

    def line(self) -> str:
        per = max(self.alphas, 1)
        return (f"load {self.load:.2f}s, per α: merge {self.merge / per:.3f}s, "
                f"evaluate {self.evaluate / per:.2f}s ({self.alphas} α)")


class ItemRunner:
    """Runs items on one process, reusing the feature table across items."""

    def __init__(self, cfg: Config, progress: bool = False):
        self.cfg, self.progress = cfg, progress
        self.features = FeatureTable(Path(cfg.eval.features or store_path(cfg)))
        problems = ProblemLog()
        self.tasks = prepare(task_specs(cfg, sweep_tasks(cfg)), self.features, problems)
        problems.report("sweep tasks")

    def run(self, item: WorkItem) -> Timing | None:
        """Run one item unless it is done; returns its timing (None when skipped)."""
        if is_done(self.cfg, item):
            return None
        timing, t0 = Timing(), time.perf_counter()
        root = self.cfg.root
        text, mm = root / item.text, root / item.mm
        method = get_method(item.method)
        if method.needs_grams:
            for ckpt in (text, mm):
                write_grams(self.cfg, ckpt)
        pair = Pair.open(text, mm, root / item.base if item.base else None, grams=method.needs_grams)
        merger = PairMerger(pair)
        model, tokenizer = load_model(text)
        scorer = Scorer(model, tokenizer, features=self.features, image_prefix=self.cfg.eval.image_prefix,
                        dtype=self.cfg.eval.dtype, batch_size=self.cfg.eval.batch_size)
        timing.load = time.perf_counter() - t0

        self._endpoints(item, merger, model, scorer)
        self._distances(item, pair)
        info = ModelInfo.of_pair(checkpoint_run(text), checkpoint_run(mm), item.method, item.params)
        rows, items = [], []
        for alpha in item.alphas:
            t = time.perf_counter()
            merger.merge_into(model, item.method, alpha, json.loads(item.params))
            timing.merge += time.perf_counter() - t
            t = time.perf_counter()
            r, i = result_rows(dataclasses.replace(info, alpha=alpha), evaluate(scorer, self.tasks),
                               item_id=item.item_id, config_hash=self.cfg.hash())
            timing.evaluate += time.perf_counter() - t
            rows, items = rows + r, items + i
            timing.alphas += 1
        write_rows(items, ITEMS_SCHEMA, items_path(self.cfg, item.item_id))
        write_rows(rows, RESULTS_SCHEMA, metrics_path(self.cfg, item.item_id))  # last: marks the item done
        return timing

    def _endpoints(self, item: WorkItem, merger: PairMerger, model, scorer: Scorer) -> None:
        """Each unmerged twin, evaluated once per checkpoint (α = 1 is the text model, α = 0 the
        multimodal one, bitwise, so the pair already in memory serves)."""
        for rel, alpha in ((item.text, 1.0), (item.mm, 0.0)):
            name = "endpoint-" + fingerprint([rel, item.salt])[:12]
            if finished(self.cfg, name):
                continue
            merger.merge_into(model, "linear", alpha)
            info = ModelInfo.unmerged(checkpoint_run(self.cfg.root / rel))
            rows, items = result_rows(info, evaluate(scorer, self.tasks), item_id=name,
                                      config_hash=self.cfg.hash())
            write_rows(items, ITEMS_SCHEMA, items_path(self.cfg, name))
            write_rows(rows, RESULTS_SCHEMA, metrics_path(self.cfg, name))

    def _distances(self, item: WorkItem, pair: Pair) -> None:
        if not self.cfg.sweep.distances:
            return
        out = self.cfg.results_dir / "distances" / f"{fingerprint([item.text, item.mm, item.base])[:12]}.parquet"
        if not out.is_file():
            write_parquet(distance_rows(pair.text, pair.mm, pair.base), out)


def run_items(cfg: Config, items: list[WorkItem], *, progress: bool = False) -> int:
    """Run every item not done yet, in order; returns how many ran."""
    runner = ItemRunner(cfg, progress)
    ran = 0
    for k, item in enumerate(items):
        timing = runner.run(item)
        status = "done already" if timing is None else timing.line()
        print(f"sweep item {k + 1}/{len(items)} {item.item_id} ({item.method}, {Path(item.mm).name}): {status}",
              file=sys.stderr if timing is None else sys.stdout)
        ran += timing is not None
    return ran


def best_text_pairing(cfg: Config) -> dict[Path, Path]:
    """Every multimodal checkpoint -> the text checkpoint with the best mean accuracy on
    sweep.best_text_task (the paper's pairing); the scores are kept in results/<exp>/best_text.json."""
    cache = cfg.results_dir / "best_text.json"
    task = cfg.sweep.best_text_task
    salt = eval_salt(cfg, [task])
    scores = read_json(cache) if cache.is_file() else {}
    if scores.get("salt") != salt:
        features = FeatureTable(Path(cfg.eval.features or store_path(cfg)))
        tasks = prepare(task_specs(cfg, [task]), features, ProblemLog())
        scores = {"salt": salt, "task": task, "accuracy": {}}
        for ckpt in run_checkpoints(cfg, "text"):
            model, tokenizer = load_model(ckpt)
            scorer = Scorer(model, tokenizer, features=features, image_prefix=cfg.eval.image_prefix,
                            dtype=cfg.eval.dtype, batch_size=cfg.eval.batch_size)
            (result,) = evaluate(scorer, tasks)
            acc = next(m.value for m in result.metrics if m.subtask == "" and m.metric == "accuracy")
            scores["accuracy"][str(ckpt.relative_to(cfg.root))] = acc
        write_json(cache, scores)
    best = cfg.root / max(scores["accuracy"], key=scores["accuracy"].get)
    return {m: best for m in run_checkpoints(cfg, "multimodal")}
