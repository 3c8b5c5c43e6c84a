"""`vlmerge eval`: score a model on tasks; results and per-item scores to Parquet; a table at the end."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from vlmerge.config import Config, task_paths
from vlmerge.data import FeatureTable
from vlmerge.device import resolve_device
from vlmerge.errors import VlmergeError
from vlmerge.evaluate.scoring import Scorer
from vlmerge.evaluate.tasks import ItemScore, Metric, Prediction, Task, get_task
from vlmerge.hf import quiet_transformers, read_model_config
from vlmerge.io import check_creatable, remove_stale_temps, same_record, write_json
from vlmerge.layout import (babylm_dataset, babylm_predictions, checkpoint_words, eval_items_file, eval_record_file,
                            eval_results_file)
from vlmerge.model import ExpertLlavaForConditionalGeneration, is_multimodal
from vlmerge.problems import ProblemLog
from vlmerge.results import ITEMS_SCHEMA, RESULTS_SCHEMA, ModelKey, stamp, write_rows


@dataclasses.dataclass(frozen=True)
class PreparedTask:
    """A task's items and their requests, ready to be scored by any model."""

    task: Task
    items: list
    requests: list
    dataset: str = ""  # BabyLM's name for the task's data (its folder's stem)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    task: str
    metrics: list[Metric]
    items: list[ItemScore]
    predictions: list[Prediction] = dataclasses.field(default_factory=list)
    babylm: str = ""  # the pipeline's task name ("" = not a BabyLM task)
    dataset: str = ""


def load_model(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer) of one of our checkpoints or merges, or of any causal LM directory, the
    model on `device` (read into host memory first: safetensors maps the file)."""
    config = path / "config.json"
    if not config.is_file():
        raise VlmergeError(f"{path}: not a model directory (no config.json)")
    auto = AutoModelForImageTextToText if is_multimodal(read_model_config(config).get("model_type")) else AutoModelForCausalLM
    try:
        with quiet_transformers():
            # safetensors only: a pickle (pytorch_model.bin) is never opened. Mismatched shapes come back
            # in the loading info (else transformers raises a RuntimeError that names none of them).
            model, info = auto.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                               ignore_mismatched_sizes=True)
            tokenizer = load_tokenizer(path)
    except (OSError, ValueError, SafetensorError) as e:  # weights missing, truncated or garbage
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise VlmergeError(f"{path}: cannot load the model ({first.strip()[:200]}); expected a Hugging Face "
                           "directory with complete safetensors weights") from None
    if info["mismatched_keys"]:
        name, stored, expected = sorted(info["mismatched_keys"])[0]
        raise VlmergeError(f"{path}: the weights do not fit its config.json: {name} is {list(stored)} in the weights, "
                           f"{list(expected)} in the model the config describes")
    if info["missing_keys"]:  # transformers would start them from random values
        raise VlmergeError(f"{path}: the weights lack {len(info['missing_keys'])} tensor(s) of the model its "
                           f"config.json describes (the first: {sorted(info['missing_keys'])[0]})")
    return model.to(device).eval(), tokenizer


def load_tokenizer(path: Path):
    """The tokenizer saved with a model directory."""
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def task_specs(cfg: Config, given: Sequence[str]) -> list[tuple[Task, Path]]:
    """`NAME` (path from eval.tasks) or `NAME=PATH`; none given: every task of eval.tasks."""
    return [(get_task(name), path) for name, path in task_paths(given, cfg.eval.tasks, "eval.tasks")]


def with_features(task: Task, items: list, features: FeatureTable | None, problems: ProblemLog) -> list:
    """The items whose images all have a feature; the others are skipped and counted."""
    if not task.needs_images:
        return items
    if features is None:
        raise VlmergeError(f"task {task.name} needs image features: give --features or eval.features")
    kept = []
    for k, item in enumerate(items):
        images = [r.image for r in task.requests([item]) if r.image is not None]
        missing = [i for i, row in zip(images, features.rows(np.array(images))) if row < 0]
        if missing:
            problems.add(f"{task.name}[{k}]", f"no feature: image {missing[0]!r} is not in the store")
        else:
            kept.append(item)
    return kept


def unique_ids(task: Task, items: list, problems: ProblemLog) -> list:
    """The items, each id once: a later item with an id seen before is a problem, and only the first is kept
    (the results keep one row per id, so a repeated id would be scored and then collapse)."""
    first: dict[str, int] = {}
    kept = []
    for k, item in enumerate(items):
        item_id = getattr(item, "item_id", None)  # tasks whose items carry no id number them in order
        if item_id is not None and item_id in first:
            problems.add(f"{task.name}[{k}]", f"duplicate id: {item_id!r} is item {first[item_id]}'s too (kept that)")
            continue
        if item_id is not None:
            first[item_id] = k
        kept.append(item)
    return kept


def prepare(specs: Sequence[tuple[Task, Path]], features: FeatureTable | None, problems: ProblemLog) -> list[PreparedTask]:
    """Read every task once; repeated ids and items without image features are skipped and counted."""
    out = []
    for task, path in specs:
        items = with_features(task, unique_ids(task, task.load(path, problems), problems), features, problems)
        if not items:
            raise VlmergeError(f"task {task.name}: {path}: no usable items")
        out.append(PreparedTask(task, items, task.requests(items), babylm_dataset(path)))
    return out


def fitting(scorer: Scorer, tasks: Sequence[PreparedTask], problems: ProblemLog) -> list[PreparedTask]:
    """The tasks without the items that have a sequence longer than the scorer's model takes, each a problem.

    The BabyLM pipeline has no rule for them (it runs every sentence whole: past the trained positions
    of a RoPE model, and into an error for absolute position embeddings), and lm-eval's loglikelihood
    cuts the context; one such sentence of megabytes would take terabytes of attention.
    """
    out = []
    for t in tasks:
        too_long = set(scorer.prepared(t.requests).too_long.tolist())
        if not too_long:
            out.append(t)
            continue
        sizes = [len(t.task.requests([item])) for item in t.items]
        if sum(sizes) != len(t.requests):  # requests that are not each one item's (devbench_things')
            raise VlmergeError(f"task {t.task.name}: {len(too_long)} request(s) longer than {scorer.max_tokens} "
                               "tokens (eval.max_tokens)")
        starts = np.cumsum([0, *sizes])
        kept = []
        for k, item in enumerate(t.items):
            if too_long.isdisjoint(range(starts[k], starts[k + 1])):
                kept.append(item)
            else:
                problems.add(f"{t.task.name}[{k}]",
                             f"too long: a sequence over {scorer.max_tokens} tokens (eval.max_tokens)")
        if not kept:
            raise VlmergeError(f"task {t.task.name}: no usable items (every one is longer than eval.max_tokens)")
        out.append(dataclasses.replace(t, items=kept, requests=t.task.requests(kept)))
    return out


def evaluate(scorer: Scorer, tasks: Sequence[PreparedTask], model: str) -> list[TaskResult]:
    """Score and measure every task with the scorer's model as it is now (`model` names it in errors)."""
    out = []
    for t in tasks:
        scores = scorer.score(scorer.prepared(t.requests), what=f"{model}: task {t.task.name}")
        metrics, per_item = t.task.evaluate(t.items, scores)
        predictions = t.task.predict(t.items, scores) if t.task.predict else []
        out.append(TaskResult(t.task.name, metrics, per_item, predictions, t.task.babylm, t.dataset))
    return out


def result_rows(key: ModelKey, results: Sequence[TaskResult], *, item_id: str = "", config_hash: str = "",
                job_id: str = "") -> tuple[list[dict], list[dict]]:
    """Rows of the results and items datasets for one model."""
    model, prov = key.columns(item_id), stamp(config_hash, job_id)
    rows = [{**model, "task": r.task, "subtask": m.subtask, "metric": m.metric, "value": m.value, "n": m.n, **prov}
            for r in results for m in r.metrics]
    items = [{**model, "task": r.task, "subtask": i.subtask, "example_id": i.item_id, "value": i.value}
             for r in results for i in r.items]
    return rows, items


def table(results: Sequence[TaskResult]) -> str:
    """The task-level metrics (subtask '') as an aligned text table."""
    lines = [f"{'task':<18} {'metric':<18} {'value':>8} {'n':>7}"]
    for r in results:
        for m in r.metrics:
            if m.subtask == "":
                lines.append(f"{r.task:<18} {m.metric:<18} {m.value:>8.4f} {m.n:>7}")
    return "\n".join(lines)


def babylm_files(results: Sequence[TaskResult]) -> dict[tuple[str, str], dict]:
    """(pipeline task, dataset) -> the contents of its predictions.json: per UID, the predictions in
    file order with ids `<UID>_<n>` (sentence_zero_shot/compute_results.py `rank_and_evaluate`,
    `rank_and_evaluate_wug`; run.py `save_predictions`)."""
    files: dict[tuple[str, str], dict] = {}
    for r in results:
        if not r.babylm or not r.predictions:
            continue
        per_uid = files.setdefault((r.babylm, r.dataset), {})
        for p in r.predictions:
            rows = per_uid.setdefault(p.uid, {"predictions": []})["predictions"]
            rows.append(p.fields if p.fields is not None else
                        {"id": f"{p.uid}_{len(rows)}", "pred": p.pred, **({"prob": p.prob} if p.prob is not None else {})})
    return files


def config_scorer(cfg: Config, model, tokenizer, features: FeatureTable | None, *, dtype: str | None = None) -> Scorer:
    """A Scorer on the model's device with the experiment's prompt convention, dtype (or `dtype`) and
    batch limits. An expert model learns the store's null feature: a sample whose image is the black
    one routes as text."""
    if isinstance(model, ExpertLlavaForConditionalGeneration) and features is not None:
        model.null_feature = features.null
    return Scorer(model, tokenizer, features=features, prompt=cfg.eval.prompt, dtype=dtype or cfg.eval.dtype,
                  batch_size=cfg.eval.batch_size, batch_tokens=cfg.eval.batch_tokens,
                  share_prefix=cfg.eval.share_prefix, max_tokens=cfg.eval.max_tokens)


def export_babylm(results: Sequence[TaskResult], out: Path) -> list[Path]:
    """Write BabyLM 2025's predictions.json of every BabyLM task, in the layout its collate_preds.py reads."""
    written = []
    for (task, dataset), content in babylm_files(results).items():
        path = babylm_predictions(out, task, dataset)
        write_json(path, content)
        written.append(path)
    return written


def aoa_command(cfg: Config, checkpoints: Sequence[Path], words: Path, cdi: Path, *, dtype: str | None,
                out: Path) -> dict:
    """AoA over a run's checkpoint series: each checkpoint scored on the AoA words, then
    Pearson r of model and child AoAs (vlmerge.evaluate.tasks.aoa); written to `out` (JSON)."""
    from vlmerge.evaluate.tasks import aoa

    if len(checkpoints) < 3:
        raise VlmergeError(f"aoa: {len(checkpoints)} checkpoint(s); a sigmoid needs at least 3")
    cdi_table, problems = aoa.read_cdi(cdi), ProblemLog()
    (task,) = prepare([(get_task("aoa"), words)], None, problems)
    per_checkpoint, device = [], resolve_device(cfg.compute.device)
    for k, ckpt in enumerate(sorted(checkpoints, key=checkpoint_words)):
        model, tokenizer = load_model(ckpt, device)
        features = FeatureTable(cfg.eval_store_path) if is_multimodal(model.config.model_type) else None
        scorer = config_scorer(cfg, model, tokenizer, features, dtype=dtype)
        if k == 0:  # the run's checkpoints share a tokenizer and positions: the same words for all
            (task,) = fitting(scorer, [task], problems)
        (result,) = evaluate(scorer, [task], str(ckpt))
        per_checkpoint.append((checkpoint_words(ckpt), [(i.item_id, i.value) for i in result.items]))
    problems.report("aoa")
    r, n = aoa.aoa_fitness(aoa.series_of(per_checkpoint), cdi_table)
    summary = {"task": "aoa", "metric": "pearson", "value": r, "n_words": n,
               "words_seen": [w for w, _ in per_checkpoint], "checkpoints": [str(c) for c in sorted(checkpoints)]}
    write_json(out, summary)
    print(f"aoa: Pearson r {r:.4f} over {n} words, {len(per_checkpoint)} checkpoints -> {out}")
    return summary


# A series of the sweep's models: one twin, or one merge setting, over the checkpoints (pairs).
AOA_SERIES = ["experiment", "text_run", "mm_run", "method", "method_params", "alpha"]


def aoa_sweep_command(cfg: Config, cdi: Path, *, out: Path) -> list[dict]:
    """AoA of every series the sweep scored on the `aoa` task: each twin over its checkpoints and each
    merge setting (method, parameters, α) over the checkpoint pairs, from the per-item surprisals
    the sweep stored (no model is scored again); written to `out` (JSON, one object per series)."""
    from vlmerge.evaluate.tasks import aoa
    from vlmerge.results import read_item_scores

    results_dir = cfg.layout.results_dir
    cdi_table = aoa.read_cdi(cdi)
    items = read_item_scores(results_dir, "aoa")
    if items.empty:
        raise VlmergeError(f"{results_dir}: no aoa item scores; put aoa in sweep.tasks (and eval.tasks) and run the sweep")
    # The words seen of a same-words pair (or of a multimodal twin on its own).
    items["words_seen"] = items.text_words.fillna(items.mm_words)
    series = []
    for key, rows in items.groupby(AOA_SERIES, dropna=False, sort=True):
        per_checkpoint = [(int(seen), list(zip(g.example_id, g.value))) for seen, g in rows.groupby("words_seen")]
        r, n = aoa.aoa_fitness(aoa.series_of(per_checkpoint), cdi_table) if len(per_checkpoint) >= 3 else (None, 0)
        series.append({**dict(zip(AOA_SERIES, key)), "metric": "pearson", "value": r, "n_words": n,
                       "words_seen": [w for w, _ in per_checkpoint]})
    write_json(out, series)
    print(f"{'run or merge':40} {'alpha':>6} {'points':>6} {'pearson':>8} {'words':>6}")
    for s in series:
        name = (s["text_run"] or s["mm_run"]) if s["method"] == "none" else f"{s['method']} {s['method_params']}"
        value = "-" if s["value"] is None else f"{s['value']:.4f}"
        print(f"{name[:40]:40} {s['alpha']:6.2f} {len(s['words_seen']):6d} {value:>8} {s['n_words']:6d}")
    print(f"aoa: {len(series)} series (fewer than 3 checkpoints: no fit, value null) -> {out}")
    return series


def check_out(out: Path, record: dict) -> None:
    """`--out` is a folder that can be written (checked before scoring, not after), whose results, if it has
    any, are of the evaluation `record` describes (as `merge` refuses to write over another merge); stale
    temp files go."""
    if out.exists() and not out.is_dir():
        files = f"{eval_results_file(out).name} and {eval_items_file(out).name}"
        raise VlmergeError(f"{out}: --out is a file; expected a folder for {files}")
    check_creatable(out)
    written = any(f.exists() for f in (eval_results_file(out), eval_items_file(out)))
    if written and not same_record(eval_record_file(out), record):
        raise VlmergeError(f"{out}: holds the results of another evaluation than this one ({record['model']}); "
                           "remove it or choose another --out")
    remove_stale_temps(out)


def write_results(cfg: Config, key: ModelKey, results: Sequence[TaskResult], out: Path, record: dict,
                  job_id: str = "") -> None:
    """The record of the evaluation, then the results and items Parquet files of one model in `out`, and the table."""
    rows, items = result_rows(key, results, config_hash=cfg.hash(), job_id=job_id)
    write_json(eval_record_file(out), record)
    write_rows(rows, RESULTS_SCHEMA, eval_results_file(out))
    write_rows(items, ITEMS_SCHEMA, eval_items_file(out))
    print(table(results))
    print(f"eval: {len(rows)} result rows, {len(items)} item rows -> {out}")


def eval_command(cfg: Config, model_dir: Path, tasks: Sequence[str], *, dtype: str | None, features: str | None,
                 out: Path, job_id: str = "", export: Path | None = None,
                 shuffle_features: int | None = None) -> list[TaskResult]:
    specs = task_specs(cfg, tasks)
    record = {"model": str(model_dir.resolve()), "shuffle_features": shuffle_features}  # what --out holds
    check_out(out, record)
    model, tokenizer = load_model(model_dir, resolve_device(cfg.compute.device))
    store = Path(features) if features else cfg.eval_store_path
    needs_store = is_multimodal(model.config.model_type) or any(t.needs_images for t, _ in specs)
    table_ = FeatureTable(store) if needs_store else None
    if shuffle_features is not None:
        if table_ is None:
            raise VlmergeError(f"--shuffle-features: {model_dir} and these tasks read no image features")
        table_.shuffle(shuffle_features)
        print(f"eval: image features shuffled (seed {shuffle_features}): a control, not the model's score")
    scorer = config_scorer(cfg, model, tokenizer, table_, dtype=dtype)
    problems = ProblemLog()
    tasks_ = fitting(scorer, prepare(specs, table_, problems), problems)
    problems.report("eval")
    results = evaluate(scorer, tasks_, str(model_dir))
    write_results(cfg, ModelKey.of_directory(model_dir), results, out, record, job_id)
    if export is not None:
        print(f"eval: {len(export_babylm(results, export))} BabyLM prediction files -> {export}")
    return results


def harness_command(cfg: Config, model: Path | torch.nn.Module, tasks: Sequence[str], *, out: Path,
                    include_path: Sequence[Path] = (), tokenizer=None, features: str | FeatureTable | None = None,
                    dtype: str | None = None, key: ModelKey | None = None, job_id: str = "") -> dict:
    """`vlmerge eval --harness`: lm-eval's `tasks` on a model directory, or on a model held in memory (with
    its tokenizer, and the feature store for a multimodal one: the sweep's merges), scored by the
    Scorer (vlmerge.evaluate.harness); lm-eval's results and samples to out/harness/, our rows (task
    `harness/<task>`) to the Parquet files of `vlmerge eval`. Returns lm-eval's results dict."""
    from vlmerge.evaluate.harness import VlmergeLM, harness_results, run_tasks, write_harness

    # A model held in memory is named by its key, or has none to compare
    name = str(model.resolve()) if isinstance(model, Path) else json.dumps(dataclasses.asdict(key or ModelKey()))
    record = {"model": name, "shuffle_features": None}
    check_out(out, record)
    if isinstance(model, Path):
        key = key or ModelKey.of_directory(model)
        model, tokenizer = load_model(model, resolve_device(cfg.compute.device))
    elif tokenizer is None:
        raise VlmergeError("harness: a model held in memory needs its tokenizer")
    if not is_multimodal(model.config.model_type):
        features = None  # a text model reads no features (harness tasks have no images)
    elif not isinstance(features, FeatureTable):
        features = FeatureTable(Path(features) if features else cfg.eval_store_path)
    scorer = config_scorer(cfg, model, tokenizer, features, dtype=dtype)
    results = run_tasks(VlmergeLM(scorer), tasks, include_path)
    write_harness(results, out / "harness")
    write_results(cfg, key or ModelKey(), harness_results(results), out, record, job_id)
    print(f"eval: lm-eval's results -> {out / 'harness' / 'results.json'}")
    return results
