"""lm-evaluation-harness on our models (BabyLM 2026 evaluates with it): `VlmergeLM`, an lm-eval `LM`.

Every log-likelihood comes from the project's `Scorer`, so that the harness's numbers are the ones
`vlmerge eval` gives the same strings, under the same `eval.prompt` (takmaz2025: BOS, then
"<image> " + text with the black image's feature, for our multimodal models; text: a plain causal
LM's own tokenisation). Deliberate differences from lm-eval's HFLM:

- `loglikelihood(context, continuation)` is the Scorer's score of Request(continuation, context):
  BabyLM's span rule (the tokens that end after the continuation's first character; a sequence's
  first token is never scored), not HFLM's separate tokenisation of context and continuation.
  `is_greedy` is computed, not assumed: every scored token is the argmax at its position.
- `loglikelihood_rolling(text)` is the Scorer's score of Request(text): no EOS is put before the
  text (under `text`, a tokenizer without BOS leaves the first token unscored, as BabyLM does). A text
  longer than the model's max length is scored in lm-eval's rolling windows (`rolling_windows`).
- A loglikelihood request longer than the max length is refused: lm-eval would cut its context from
  the left, and the score would not be `vlmerge eval`'s.
- Generation tasks (`generate_until`) and tasks with images (`doc_to_image`) are refused.

lm-eval takes seconds to import: import this module only where the harness runs (run.harness_command).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window

from vlmerge.errors import VlmergeError
from vlmerge.evaluate.run import TaskResult
from vlmerge.evaluate.scoring import Scorer, common_prefix
from vlmerge.evaluate.tasks import ItemScore, Metric, Request
from vlmerge.io import remove_stale_temps, write_json, write_jsonl

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def rolling_windows(seq: Sequence[int], scored: int, prompt: Sequence[int],
                    max_length: int) -> list[tuple[list[int], int]]:
    """(ids, scored tokens at the end) of the sequences that score the last `scored` tokens of `seq` once
    each in at most `max_length` tokens: `seq` itself when it fits; else lm-eval's rolling windows
    (`get_rolling_token_windows`, context_len 1, made disjoint, as HFLM does) over those tokens. The
    first is `seq` cut short; each later one is headed by the prompt's own tokens (`prompt`: the
    sequence of the empty text, e.g. BOS and the image token) where lm-eval has none, since our
    multimodal models need their image token in every window."""
    if len(seq) <= max_length:
        return [(list(seq), scored)]
    head, body = list(seq[: len(seq) - scored]), list(seq[len(seq) - scored:])
    header = head[: min(common_prefix([seq, prompt]), len(head))]
    span = max_length - max(len(head), len(header) + 1)
    if span < 1:
        raise VlmergeError(f"rolling log-likelihood: the prompt's {len(head)} tokens leave no room in the model's "
                           f"max length {max_length}")
    windows = map(make_disjoint_window, get_rolling_token_windows(body, -1, span, 1))  # -1: dropped below
    return [(head + pred if k == 0 else header + context + pred, len(pred))
            for k, (context, pred) in enumerate(windows)]


class VlmergeLM(LM):
    """A model held by a `Scorer` (a checkpoint, a merge, a model merged in memory) as an lm-eval LM."""

    def __init__(self, scorer: Scorer, max_length: int | None = None):
        super().__init__()
        self.scorer = scorer
        self.max_length = max_length or scorer.max_positions
        self._device = scorer.device

    @staticmethod
    def _args(requests: Sequence, n: int) -> list[tuple]:
        """The text arguments of each request; an image (a task's doc_to_image) is refused."""
        for r in requests:
            if len(r.args) > n:
                raise VlmergeError(f"lm-eval task {r.task_name}: tasks with images (doc_to_image) are not supported; "
                                   "our models read precomputed features of the store, not pixels")
        return [r.args for r in requests]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) of each request, by the Scorer's rule."""
        # One group per document: a multiple-choice item's candidates share a row (their common prefix once).
        docs: dict[tuple, int] = {}
        reqs = [Request(continuation, context=context, group=docs.setdefault((r.task_name, r.doc_id), len(docs)))
                for r, (context, continuation) in zip(requests, self._args(requests, 2))]
        seqs, lengths, owners = self.scorer.sequences(reqs)
        for seq, owner in zip(seqs, owners):
            if len(seq) > self.max_length:
                r = requests[owner]
                raise VlmergeError(f"lm-eval task {r.task_name}, document {r.doc_id}: {len(seq)} tokens with the "
                                   f"prompt, over the model's max length {self.max_length}; loglikelihood requests "
                                   "are scored whole (cutting the context would change the score)")
        scores = self.scorer.score(self.scorer.prepare_sequences(reqs, seqs, lengths, owners), greedy=True)
        return [(float(lp), bool(g)) for lp, g in zip(scores.logprob, scores.greedy)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request, in rolling windows where it is longer than the max length."""
        texts = [text for (text,) in self._args(requests, 1)]
        seqs, lengths, _ = self.scorer.sequences([Request(t) for t in texts])
        (prompt,), _, _ = self.scorer.sequences([Request("")])
        windows, owners = [], []
        for k, (seq, scored) in enumerate(zip(seqs, lengths)):
            if scored:  # else log p = 0 (an empty text, or one token that no position predicts)
                windows += rolling_windows(seq, scored, prompt, self.max_length)
                owners += [k] * (len(windows) - len(owners))
        # each window a group of its own: a row each
        reqs = [Request("", group=w) for w in range(len(windows))]
        prepared = self.scorer.prepare_sequences(reqs, [ids for ids, _ in windows], [n for _, n in windows],
                                                 range(len(windows)))
        per_window = self.scorer.score(prepared).logprob
        return np.bincount(owners, weights=per_window, minlength=len(texts)).tolist()

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise VlmergeError("lm-eval generation tasks (output_type generate_until) are not supported: our models are "
                           "evaluated by log-likelihood only (multiple_choice, loglikelihood, loglikelihood_rolling)")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No download from the Hub in the block: the environment, and the flags that `datasets` and
    huggingface_hub read from it when they were imported."""
    import datasets.config
    import huggingface_hub.constants

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, dict.fromkeys(OFFLINE_ENV, "1")))
        stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            stack.enter_context(mock.patch.object(datasets.config, flag, True))
        yield


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """The caller's random, numpy and torch generators as they were after the block (simple_evaluate
    seeds all three; a sweep goes on with its own)."""
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...]):
    """lm-eval's index of its own tasks and those under `include_path`, built once per process (it reads
    some 15,000 task YAMLs: 15 s on 2 cores; a sweep runs the harness at every α)."""
    return TaskManager(include_path=list(include_path) or None)


def run_tasks(lm: VlmergeLM, tasks: Sequence[str], include_path: Sequence[Path] = (),
              bootstrap_iters: int = 100000) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` (its own, or task YAMLs under `include_path`) on `lm`,
    offline; its results dict, the samples included."""
    with offline(), kept_rng():
        manager = task_manager(tuple(str(Path(p).resolve()) for p in include_path))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            where = f" or under {', '.join(map(str, include_path))}" if include_path else ""
            raise VlmergeError(f"--harness {','.join(unknown)}: no such lm-eval task{where} "
                               "(give the folder of custom task YAMLs with --harness-include)")
        try:
            return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, log_samples=True,
                                   bootstrap_iters=bootstrap_iters)
        except ConnectionError as e:  # datasets' refusal to reach the Hub offline
            raise VlmergeError(f"harness: {e}: nothing is downloaded; point the task's YAML at local files "
                               "(dataset_path: json, dataset_kwargs: {data_files: …}) and --harness-include "
                               "its folder") from None


def serialisable(obj):
    """`obj` as JSON can hold it, by lm-eval's own rule for what JSON cannot (str of the object)."""
    return json.loads(json.dumps(obj, default=handle_non_serializable))


def write_harness(results: dict, folder: Path) -> None:
    """lm-eval's results.json (`simple_evaluate`'s dict less the samples) and samples_<task>.jsonl, atomically."""
    remove_stale_temps(folder)
    write_json(folder / "results.json", serialisable({k: v for k, v in results.items() if k != "samples"}))
    for task, samples in results.get("samples", {}).items():
        write_jsonl(folder / f"samples_{task}.jsonl", serialisable(samples))


def is_number(v) -> bool:
    """A metric's value (lm-eval writes "N/A" for a stderr it has not computed)."""
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def documents(results: dict, task: str) -> int:
    """The documents lm-eval scored for a task, or for a group's tasks."""
    if task in results.get("n-samples", {}):
        return results["n-samples"][task]["effective"]
    return sum(documents(results, t) for t in results.get("group_subtasks", {}).get(task, []))


def harness_results(results: dict) -> list[TaskResult]:
    """Our rows of lm-eval's results: task `harness/<task>`, its metrics by lm-eval's names (`acc`,
    `acc_stderr`; `metric,filter` for a filter other than none), and per document the task's first
    metric where it is a number."""
    out = []
    for task, values in results["results"].items():
        n = documents(results, task)
        metrics = []
        for key, value in values.items():
            name, comma, filt = key.partition(",")
            # metrics are `metric,filter` (not name, alias, sample_len); a stderr is "N/A" where lm-eval has none
            if comma and is_number(value):
                metrics.append(Metric("", name if filt == "none" else key, float(value), n))
        first = (results.get("configs", {}).get(task, {}).get("metric_list") or [{}])[0].get("metric")
        items = [ItemScore(str(s["doc_id"]), "", float(s[first])) for s in results.get("samples", {}).get(task, [])
                 if is_number(s.get(first))]
        out.append(TaskResult(f"harness/{task}", metrics, items))
    return out
