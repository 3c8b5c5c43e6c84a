"""DevBench (Tan et al. 2024) as BabyLM 2025 runs it: `devbench_vv`, `devbench_trog`, `devbench_things`.

Data: the folder BabyLM's `evaluation_pipeline/devbench/download_data.sh` writes,
`evaluation_data/full_eval/devbench/`, is every task's path:

- `assets/<task>/manifest.csv`: lex-viz_vocab, gram-trog: `image1`…`image4`, `text1`, one trial a
  row, the matching image first; sem-things: `text1` (the THINGS concept), `image1`. Image paths
  are relative to `assets/<task>/`.
- `evals/lex-viz_vocab/human.csv`: `text1, age_bin, trial, image1`…`image4` (the proportion of
  children of the age bin choosing each image); `evals/gram-trog/human.csv`: `trial, text1,
  image1`…`image4`; `evals/sem-things/spose_similarity.mat`: `spose_sim`, the human similarity
  matrix of the concepts in manifest order.

Image ids (the feature store's): an image's path relative to the DevBench folder, with `/`:
`assets/<task>/<manifest path>`, e.g. "assets/lex-viz_vocab/images/acorn.jpg". lex-viz_vocab's
`images/` is a link to sem-things' `object_images_CC0/`, so one file has two ids (it is encoded
twice). A `features.images` source of format `devbench` (the folder as its `manifest`) gives
`vlmerge precompute` every image of the three (precompute/manifests.py reads the manifests).

vv and trog (comparison/viz_vocab.py, trog.py, stats_helper.py): each (trial, image) is one
request, the text after the image (the BabyLM baselines' generative score, "caption log-probability
given the image"; babylm_models.py scores "The caption for this image is: {text}." and we score the
bare text, as for Winoground). The similarity s is its log-probability per token (the baselines'
−loss, a per-token mean). Rules, all ported:
- accuracy: s(image1) > s(image2, 3, 4), strict (a tie is wrong), over the trials;
- KL: human proportions p and model distribution q = softmax(β·s) per trial; KL(p‖q) =
  Σ p log(p/q) with p, q clipped to [1e-10, 1]; the mean over the trials that both have, matched
  by trial number (the manifest row, from 1); β minimising it over [0.025, 40] by DIRECT-L, at
  most 200 evaluations. vv: one (kl, β) per age bin (subtask "age_bin:<a>"); trog: one.
Differences: the official optimiser is NLopt's GN_DIRECT_L, which also stops once an iteration
improves the minimum by < 1e-4 (ftol_abs); ours is scipy's DIRECT-L (Gablonsky's), without that
stop, so its KL can be a little lower (against NLopt on the real human data and random scores:
0 to 3e-4 lower, β within 2%). The official softmax subtracts the global maximum of all trials,
ours each row's (the same, except where the official underflows to 0/0 = NaN). Note that
gram-trog's human.csv has two trials the manifest lacks (its 59 and 60): from trial 59 on, a
manifest trial t is compared with human trial t, whose sentence is the manifest's t − 2;
matching by number keeps that, as the leaderboard has it.

things (comparison/things.py): the official embedding of an image is the mean last hidden state
of the model over the image and a dummy text (babylm_models.py `get_all_image_feats`); then the
cosine similarity matrix of the images, and `rsa`: Spearman ρ of its lower triangle (k = −1) with
the human matrix's. A task here gets log-probabilities only, so an image's embedding is its
profile over probe texts: the per-token log-probability of every concept name of the manifest
after the image (n × n requests: 1854² for THINGS). `rsa` centres each probe over the images
first (log p(c | i) − mean_i log p(c | i), a PMI-like profile), because the raw profiles share the
text prior log p(c), which says nothing about the image and would dominate the cosines;
`rsa_uncentred` is the same without centring. An image without a feature drops its row and
column of the human matrix and its probe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import scipy.io
from scipy.optimize import direct
from scipy.stats import spearmanr

from vlmerge.errors import VlmergeError
from vlmerge.evaluate.tasks import ItemScore, Metric, Request, Scores, Task, register
from vlmerge.precompute.manifests import DEVBENCH_FOLDERS, devbench_image_columns, devbench_manifest, devbench_records
from vlmerge.problems import ProblemLog

BETA_BOUNDS = (0.025, 40.0)  # stats_helper.get_opt_kl
MAX_EVALS = 200
PROBES_PER_GROUP = 64  # a group's requests of one image share a row: 64 short words keep it short


@dataclasses.dataclass(frozen=True)
class Trial:
    """One vv or trog trial: its text, its images (the matching one first) and the children's choices."""

    trial: int  # the manifest row, from 1: the official `trial`, matched with the human data's
    text: str
    images: tuple[str, ...]  # image ids
    human: dict[str, np.ndarray]  # per age bin ("" for trog): the proportion choosing each image


@dataclasses.dataclass(frozen=True)
class ThingsImage:
    index: int  # the manifest row, from 0: the row and column of the human matrix
    concept: str
    image: str
    human: np.ndarray  # its row of the human similarity matrix


# --- the comparison maths ------------------------------------------------------------------------


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p‖q) = Σ p log(p/q) over the last axis, both clipped to [1e-10, 1] (stats_helper.kl_divergence)."""
    p, q = np.clip(p, 1e-10, 1.0), np.clip(q, 1e-10, 1.0)
    return np.sum(p * np.log(p / q), axis=-1)


def softmax_rows(s: np.ndarray, beta: float) -> np.ndarray:
    """softmax(β·s) of each row."""
    z = beta * s
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mean_kl(human: np.ndarray, sims: np.ndarray, beta: float) -> float:
    """The mean over trials (rows) of KL(human ‖ softmax(β·sims)) (stats_helper.get_mean_kl_img)."""
    return float(np.mean(kl_divergence(human, softmax_rows(sims, beta))))


def fit_beta(human: np.ndarray, sims: np.ndarray) -> tuple[float, float]:
    """(the least mean KL, its β) over β in [0.025, 40] by DIRECT-L (stats_helper.get_opt_kl)."""
    # Jones' ε = 0, as NLopt's DIRECT-L runs
    res = direct(lambda b: mean_kl(human, sims, b[0]), [BETA_BOUNDS], eps=0.0, maxfun=MAX_EVALS, locally_biased=True)
    return float(res.fun), float(res.x[0])


def trial_correct(sims: np.ndarray) -> np.ndarray:
    """Per trial (row): does the first image score strictly above every other (viz_vocab.get_scores)?"""
    return sims[:, 0] > sims[:, 1:].max(axis=1)


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows (a zero row: 0 with everything, as sklearn's)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norm == 0, 1.0, norm)
    return unit @ unit.T


def rsa(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman ρ of the two matrices' lower triangles, diagonal excluded (stats_helper.rsa)."""
    rows, cols = np.tril_indices_from(a, k=-1)
    return float(spearmanr(a[rows, cols], b[rows, cols]).statistic)


# --- files ---------------------------------------------------------------------------------------


def _human(root: Path, task: str, images: int, problems: ProblemLog) -> dict[str, dict[int, np.ndarray]]:
    """age bin ("" for trog) -> trial -> proportions; an empty cell is 0 (the official fillna(0))."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for where, row in devbench_records(root / "evals" / DEVBENCH_FOLDERS[task] / "human.csv", "human data"):
        try:
            trial = int(row["trial"])
            probs = np.array([float(row[c] or 0) for c in devbench_image_columns(row)])
        except (KeyError, TypeError, ValueError):
            problems.add(where, "malformed line: expected an integer trial and numbers image1, image2, …")
            continue
        if len(probs) != images:
            problems.add(where, f"malformed line: {len(probs)} image columns, the manifest has {images}")
            continue
        age = (row.get("age_bin") or "").strip() if task == "vv" else ""
        if task == "vv" and not age:
            problems.add(where, "malformed line: no age_bin")
            continue
        per_trial = out.setdefault(age, {})
        if trial in per_trial:
            problems.add(where, f"malformed line: trial {trial} again (kept the first)")
            continue
        per_trial[trial] = probs
    return out


def load_trials(task: str, path: Path, problems: ProblemLog) -> list[Trial]:
    """The trials of the manifest, each with its human proportions."""
    rows, _ = devbench_manifest(path, task, problems)
    human = _human(path, task, len(rows[0][2]) if rows else 4, problems)
    return [Trial(n, text, images, {a: t[n] for a, t in human.items() if n in t}) for n, text, images in rows]


def load_things(path: Path, problems: ProblemLog) -> list[ThingsImage]:
    """The manifest's images, each with its row of the human similarity matrix."""
    rows, size = devbench_manifest(path, "things", problems)
    mat = path / "evals" / DEVBENCH_FOLDERS["things"] / "spose_similarity.mat"
    if not mat.is_file():
        raise VlmergeError(f"{mat}: DevBench human similarities not found")
    human = np.asarray(scipy.io.loadmat(mat)["spose_sim"], dtype=np.float64)
    if human.shape != (size, size):
        raise VlmergeError(f"{mat}: spose_sim is {human.shape}, the manifest has {size} rows")
    return [ThingsImage(n - 1, text, images[0], human[n - 1]) for n, text, images in rows]


# --- requests and metrics ------------------------------------------------------------------------


def trial_requests(items: Sequence[Trial]) -> list[Request]:
    """(text, image k) for each trial's images in order; one group per trial."""
    return [Request(it.text, image=img, group=k) for k, it in enumerate(items) for img in it.images]


def per_token(items: Sequence, scores: Scores) -> np.ndarray:
    """The log-probability per token of each request, one row per item."""
    return (scores.logprob / scores.tokens).reshape(len(items), -1)


def evaluate_trials(items: Sequence[Trial], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """Accuracy over the trials; per age bin the least mean KL to the children and its β."""
    sims = per_token(items, scores)
    correct = trial_correct(sims)
    metrics = [Metric("", "accuracy", float(np.mean(correct)), len(items))]
    for age in dict.fromkeys(a for it in items for a in it.human):
        rows = [k for k, it in enumerate(items) if age in it.human]
        kl, beta = fit_beta(np.stack([items[k].human[age] for k in rows]), sims[rows])
        sub = f"age_bin:{age}" if age else ""
        metrics += [Metric(sub, "kl", kl, len(rows)), Metric(sub, "beta", beta, len(rows))]
    return metrics, [ItemScore(str(it.trial), "", float(ok)) for it, ok in zip(items, correct)]


def probes(items: Sequence[ThingsImage]) -> list[str]:
    """The probe texts: the items' concept names, once each, in order."""
    return list(dict.fromkeys(it.concept for it in items))


def things_requests(items: Sequence[ThingsImage]) -> list[Request]:
    """(probe, image) for each image and every probe; an image's probes in groups of 64."""
    texts = probes(items)
    chunks = -(-len(texts) // PROBES_PER_GROUP)
    return [Request(p, image=it.image, group=k * chunks + j // PROBES_PER_GROUP)
            for k, it in enumerate(items) for j, p in enumerate(texts)]


def evaluate_things(items: Sequence[ThingsImage], scores: Scores) -> tuple[list[Metric], list[ItemScore]]:
    """RSA of the images' probe profiles (centred per probe, and raw) with the human similarities."""
    profiles = per_token(items, scores)
    index = [it.index for it in items]
    human = np.stack([it.human[index] for it in items])
    return [Metric("", "rsa", rsa(human, cosine_matrix(profiles - profiles.mean(axis=0))), len(items)),
            Metric("", "rsa_uncentred", rsa(human, cosine_matrix(profiles)), len(items))], []


register(Task("devbench_vv", partial(load_trials, "vv"), trial_requests, evaluate_trials, needs_images=True))
register(Task("devbench_trog", partial(load_trials, "trog"), trial_requests, evaluate_trials, needs_images=True))
register(Task("devbench_things", load_things, things_requests, evaluate_things, needs_images=True))
