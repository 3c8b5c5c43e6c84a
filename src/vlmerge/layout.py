"""Every on-disk name of the suite, built and parsed here and nowhere else (docs/architecture.md, "On-disk layout").

Under the output root (`paths.root`):

    demo/                                                the built-in demo world
    features/<store>.h5                                  the feature store
    features/<store>.config.yaml                         the config that made it
    features/<store>.shards/<store>-<i>-of-<n>.h5        array tasks' shards (removed once linked)
    features/<store>.shards/<store>-import-<prefix>.h5   an imported release's shard
    features/<prefix>.captions.jsonl                     an import's captions, as a manifest
    runs/<exp>/tokenizer/                                the BPE tokenizer
    runs/<exp>/corpus/<source>/{tokens,offsets,words,images}-<k>.npy + index.json
    runs/<exp>/<run>/config.yaml, metrics.jsonl
    runs/<exp>/<run>/train.lock                          held while a training runs (`vlmerge.locks`)
    runs/<exp>/<run>/tensorboard/events.out.tfevents.*   train.monitor: metrics.jsonl's rows for TensorBoard
    runs/<exp>/<run>/wandb/offline-run-*/                train.monitor: the same as a W&B offline run
    runs/<exp>/<run>/checkpoints/words-<12 digits>/      a Hugging Face checkpoint
    runs/<exp>/<run>/deepspeed/step-<9 digits>/, latest  resumable DeepSpeed state
    results/<exp>/{metrics,items,distances}/<name>.parquet, best_text.json
    results/<exp>/.compact.lock                          held while `results compact` runs
    results/<exp>/babylm/<model>/main/…                  sweep.export_babylm's prediction files
    reports/<exp>/                                       the analysis
    <merge --out>/alpha-<a.aa>/                           `vlmerge merge` at several α
    <model folder>/README.md                             a checkpoint's or a merge's model card
    <merge folder>/mergekit.yaml                         mergekit's recipe of the merge
    <merge --out>.text-models/<role>/                    where the recipe reads the inputs' language
                                                         models (`vlmerge export-text`)
    runs/<exp>-<variant>-seed<K>/, runs/<exp>-maa/       `vlmerge study`: one experiment per expert run
    logs/<exp>/                                          Slurm job logs
    logs/<exp>/<job name>-<array job>_<task>.out         an array task's log (`array_task_logs`)
    <eval --export babylm DIR>/zero_shot/causal/<task>/[<dataset>/]predictions.json  BabyLM's layout
    <export-babylm --out DIR>/chck_<n>M/, main/          a run's checkpoints as BabyLM's revisions, each
                                                         with vlmerge-export.json (its source)
    <finetune --out DIR>/finetune/<task>/{results.txt,predictions.json}  BabyLM's fine-tuning layout,
                                         with our results.parquet and items.parquet beside them

A checkpoint knows its experiment, run and words seen from its path alone (`CheckpointRef`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATES = "deepspeed"
LATEST = "latest"
RESULT_DATASETS = ("metrics", "items", "distances")
ENDPOINT_PREFIX = "endpoint-"
COMPACT_PREFIX = "compact-"
STATISTICS_PREFIX = "statistics-"  # a checkpoint's data statistics for merging (statistics_file)
CORPUS_ARRAYS = ("tokens", "offsets", "words", "starts", "images")

_CHECKPOINT = re.compile(r"words-(\d{12})")
_ARRAY_LOG = re.compile(r"(.+)-(\d+)_(\d+)\.out")  # sbatch --output=<logs>/%x-%A_%a.out (jobs/pipeline.sh)
MAA_SUFFIX = "-maa"
_STATE = re.compile(r"step-(\d{9})")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The folders and files of one experiment under one output root."""

    root: Path
    experiment: str

    def relative(self, path: str | os.PathLike | None) -> str | None:
        """What a fingerprint holds for `path` (the one rule, for every stage): root-relative inside the
        output root, so that a root moved or copied (`cp -a`) keeps its fingerprints and item ids; as given
        outside it (a user's data elsewhere is named by its path: moved, it is another input). Compared as
        written (no working folder, no symlinks resolved): the same config names the same inputs wherever
        it runs."""
        if not path:
            return path
        p, root = Path(os.path.normpath(path)), Path(os.path.normpath(self.root))
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)

    # Data preparation
    @property
    def demo_dir(self) -> Path:
        return self.root / "demo"

    @property
    def experiment_dir(self) -> Path:
        return self.root / "runs" / self.experiment

    @property
    def tokenizer_dir(self) -> Path:
        return self.experiment_dir / "tokenizer"

    @property
    def corpus_dir(self) -> Path:
        return self.experiment_dir / "corpus"

    def corpus_source_dir(self, source: str) -> Path:
        return self.corpus_dir / source

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def store(self, name: str) -> Path:
        """The feature store `features/<name>.h5`."""
        return self.features_dir / f"{name}.h5"

    def import_captions(self, prefix: str) -> Path:
        return self.features_dir / f"{prefix}.captions.jsonl"

    # Runs
    def run_dir(self, run: str) -> Path:
        return self.experiment_dir / run

    # Results and reports
    @property
    def results_dir(self) -> Path:
        """`results/<experiment>`: the sweep's metrics/, items/ and distances/ datasets."""
        return self.root / "results" / self.experiment

    @property
    def report_dir(self) -> Path:
        return self.root / "reports" / self.experiment

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs" / self.experiment


# Feature store beside its config and shards
def store_config(store: Path) -> Path:
    return store.with_suffix(".config.yaml")


def store_shard_dir(store: Path) -> Path:
    return store.with_suffix(".shards")


def store_shard(store: Path, index: int, count: int) -> Path:
    return store_shard_dir(store) / f"{store.stem}-{index:05d}-of-{count:05d}.h5"


def store_import_shard(store: Path, prefix: str) -> Path:
    return store_shard_dir(store) / f"{store.stem}-import-{prefix}.h5"


# Token shards of one corpus source
def corpus_array(folder: Path, kind: str, k: int) -> Path:
    """`<kind>-<k>.npy` of a corpus source folder (kind: tokens, offsets, words, starts, images)."""
    assert kind in CORPUS_ARRAYS, kind
    return folder / f"{kind}-{k:05d}.npy"


# Checkpoints and training state of a run
@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """What a checkpoint's path says: `<root>/runs/<experiment>/<run>/checkpoints/words-N`."""

    experiment: str
    run: str
    words: int

    @classmethod
    def parse(cls, path: Path) -> CheckpointRef | None:
        """The reference of a run checkpoint's path; None for any other directory."""
        match = _CHECKPOINT.fullmatch(path.name)
        if not match or path.parent.name != CHECKPOINTS or len(path.parents) < 4:
            return None
        return cls(path.parents[2].name, path.parents[1].name, int(match[1]))


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def checkpoint_dir(run_dir: Path, words: int) -> Path:
    return checkpoints_dir(run_dir) / f"words-{words:012d}"


def checkpoint_words(path: Path) -> int:
    """Words seen of a run checkpoint, from its name."""
    match = _CHECKPOINT.fullmatch(path.name)
    if not match:
        raise ValueError(f"{path}: not a run checkpoint (expected a words-<12 digits> folder)")
    return int(match[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, by words seen (a complete one has its trainer_state.json)."""
    found = (run_dir / CHECKPOINTS).glob("words-*")
    return sorted(p for p in found if _CHECKPOINT.fullmatch(p.name) and (p / "trainer_state.json").is_file())


def states_dir(run_dir: Path) -> Path:
    return run_dir / STATES


def state_tag(step: int) -> str:
    return f"step-{step:09d}"


def is_state_tag(name: str) -> bool:
    return _STATE.fullmatch(name) is not None


# Inside a state folder: the module weights, the engine's counters and scheduler, one part per rank
STATE_MODULE = "module"
STATE_ENGINE = "engine"
STATE_POSITION = "state.json"


def state_rank_part(rank: int) -> str:
    return f"rank-{rank:05d}"


def state_part_files(tag_dir: Path, part: str) -> tuple[Path, Path]:
    """The JSON skeleton and the safetensors tensors of one part of a state folder."""
    return tag_dir / f"{part}.json", tag_dir / f"{part}.safetensors"


def run_config(run_dir: Path) -> Path:
    return run_dir / "config.yaml"


def run_metrics_log(run_dir: Path) -> Path:
    return run_dir / "metrics.jsonl"


def run_tensorboard_dir(run_dir: Path) -> Path:
    """The run's TensorBoard log folder (`train.monitor`)."""
    return run_dir / "tensorboard"


def tensorboard_event_files(folder: Path) -> list[Path]:
    """The event files in a TensorBoard log folder (TensorBoard's own naming)."""
    return sorted(folder.glob("events.out.tfevents.*"))


def run_wandb_dir(run_dir: Path) -> Path:
    """Where `wandb.init(dir=run_dir)` writes (W&B names the folder `wandb`)."""
    return run_dir / "wandb"


def wandb_offline_runs(folder: Path) -> list[Path]:
    """The offline runs in a W&B folder (W&B's own naming: offline-run-<time>-<id>)."""
    return sorted(p for p in folder.glob("offline-run-*") if p.is_dir())


def run_lock(run_dir: Path) -> Path:
    """The lock file a training holds: one training of a run at a time (`vlmerge.locks`)."""
    return run_dir / "train.lock"


def statistics_file(checkpoint: Path, statistic: str) -> Path:
    """A data statistic of a checkpoint (`vlmerge.merge.statistics`), saved beside it."""
    return checkpoint / f"{STATISTICS_PREFIX}{statistic}.safetensors"


# `vlmerge eval --out DIR`
def eval_results_file(out: Path) -> Path:
    return out / "results.parquet"


def eval_items_file(out: Path) -> Path:
    return out / "items.parquet"


def eval_record_file(out: Path) -> Path:
    """Which model's evaluation `out` holds (`vlmerge eval` refuses to write over another's)."""
    return out / "eval.json"


# `vlmerge finetune --out DIR`: BabyLM's results/<model>/<revision>/finetune/<task>/ (evaluation_pipeline/
# finetune/run.py), one folder per task, written whole; our results.parquet and items.parquet beside
def finetune_dir(out: Path, task: str) -> Path:
    return out / "finetune" / task


def finetune_scores_file(folder: Path) -> Path:
    """The pipeline's results.txt: `metric: value` lines."""
    return folder / "results.txt"


def finetune_predictions_file(folder: Path) -> Path:
    """The pipeline's predictions.json of a fine-tuning task (`{task: {"predictions": [{id, pred}, …]}}`)."""
    return folder / "predictions.json"


# Merges written to disk
def merge_outputs(out: Path, alphas: list[float] | tuple[float, ...]) -> list[Path]:
    """`out` itself for one α; `out/alpha-0.30` and so on for several."""
    return [out] if len(alphas) == 1 else [out / f"alpha-{a:.2f}" for a in alphas]


def model_card(folder: Path) -> Path:
    """A checkpoint's or a merge's model card, in the Hugging Face Hub's format."""
    return folder / "README.md"


def mergekit_recipe(folder: Path) -> Path:
    """mergekit's YAML that reproduces the merge in `folder`."""
    return folder / "mergekit.yaml"


def mergekit_text_model(out: Path, role: str) -> Path:
    """Where a merge's recipe reads the language model of its input `role` (text, mm, base), exported
    by `vlmerge export-text`: beside the merge's `--out`, never inside a model folder (an upload of
    the merge would carry them)."""
    return out.with_name(f"{out.name}.text-models") / role


# Results
def babylm_dataset(data_path: Path) -> str:
    """BabyLM's name for a task's data (its `data_path.stem`): a folder's stem, a file's folder's."""
    return (data_path if data_path.is_dir() else data_path.parent).stem


BABYLM_NO_DATASET = frozenset({"reading"})  # tasks whose predictions.json sits in the task's folder


def babylm_predictions(out: Path, task: str, dataset: str) -> Path:
    """Where BabyLM 2025's collate_preds.py reads a causal model's predictions of `task` on `dataset`
    (`out` standing for its results/<model>/<revision>)."""
    folder = out / "zero_shot" / "causal" / task
    return (folder if task in BABYLM_NO_DATASET else folder / dataset) / "predictions.json"


def babylm_export_dir(results_dir: Path, method: str, params: dict, alpha: float, words: int) -> Path:
    """`results/<exp>/babylm/<model>/main`, the pipeline's results/<model>/<revision> of one merge
    of the sweep (`linear-alpha0.50-words000000145000`, parameters after the method)."""
    model = "-".join([method, *_param_words(params), f"alpha{alpha:.2f}", f"words{words:012d}"])
    return babylm_exports_root(results_dir) / model / "main"


def babylm_exports_root(results_dir: Path) -> Path:
    return results_dir / "babylm"


# BabyLM 2025's leaderboard revisions: `chck_<n>M` at n million words seen, n = 1…10, 20…100 by 10,
# 200…1000 by 100 (the pipeline's eval_zero_shot_fast_all_revisions.sh loops, README "Checkpoints";
# collate_preds.py lines 16-17), and `main`, the final model.
BABYLM_MAIN = "main"
BABYLM_REVISION_MILLIONS = (*range(1, 11), *range(20, 101, 10), *range(200, 1001, 100))
_BABYLM_REVISION = re.compile(r"chck_([1-9]\d*)M")
BABYLM_EXPORT_SOURCE = "vlmerge-export.json"


def babylm_revision(words: int) -> str | None:
    """`chck_<n>M` of a checkpoint at exactly n million words seen (n a leaderboard revision's); else None."""
    n, rest = divmod(int(words), 1_000_000)
    return f"chck_{n}M" if words == int(words) and not rest and n in BABYLM_REVISION_MILLIONS else None


def babylm_revision_words(revision: str) -> int | None:
    """Words seen of a `chck_<n>M` leaderboard revision; None for any other name (`main` too)."""
    m = _BABYLM_REVISION.fullmatch(revision)
    return int(m[1]) * 1_000_000 if m and int(m[1]) in BABYLM_REVISION_MILLIONS else None


def babylm_export_source(revision_dir: Path) -> Path:
    """What `export-babylm` wrote a revision folder from (experiment, run, words, text_only)."""
    return revision_dir / BABYLM_EXPORT_SOURCE


# More of what collate_preds.py reads under results/<model>/<revision> (`out`), besides `babylm_predictions`
def babylm_finetune_predictions(out: Path, task: str) -> Path:
    return finetune_predictions_file(finetune_dir(out, task))


def babylm_aoa_surprisal(out: Path) -> Path:
    return out / "zero_shot" / "causal" / "AoA_word" / "surprisal.json"


def babylm_devbench_file(out: Path, name: str) -> Path:
    """`zero_shot/devbench/<name>` (no backend folder: devbench/eval.py writes it beside them)."""
    return out / "zero_shot" / "devbench" / name


def _param_words(params: dict) -> list[str]:
    """`{"lam": 2.0, "density": 0.2}` -> ["density0.2", "lam2"]: a merge's parameters in a folder name."""
    return [f"{k}{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}{v}"
            for k, v in sorted(params.items())]


def result_dataset_dir(results_dir: Path, dataset: str) -> Path:
    """`results/<exp>/<dataset>` (dataset: metrics, items or distances)."""
    assert dataset in RESULT_DATASETS, dataset
    return results_dir / dataset


def result_file(results_dir: Path, dataset: str, name: str) -> Path:
    """`results/<exp>/<dataset>/<name>.parquet`."""
    return result_dataset_dir(results_dir, dataset) / f"{name}.parquet"


def result_files(results_dir: Path, dataset: str) -> list[Path]:
    return sorted((results_dir / dataset).glob("*.parquet"))


def endpoint_name(key: str) -> str:
    """The result file name of an unmerged twin's rows."""
    return ENDPOINT_PREFIX + key


def compact_name(key: str) -> str:
    return COMPACT_PREFIX + key


def compact_files(results_dir: Path, dataset: str) -> list[Path]:
    return sorted((results_dir / dataset).glob(f"{COMPACT_PREFIX}*.parquet"))


def compact_lock(results_dir: Path) -> Path:
    """The lock file that keeps `results compact` runs one at a time."""
    return results_dir / ".compact.lock"


# Slurm job logs
def array_task_logs(logs_dir: Path, job_name: str) -> list[tuple[int, int, Path]]:
    """(array job id, task index, log) of every array task log of jobs named `job_name` in `logs_dir`
    (`%x-%A_%a.out`), in order of job id and task."""
    found = []
    for path in logs_dir.glob(f"{job_name}-*_*.out"):
        m = _ARRAY_LOG.fullmatch(path.name)
        if m and m.group(1) == job_name:
            found.append((int(m.group(2)), int(m.group(3)), path))
    return sorted(found)


def best_text_cache(results_dir: Path) -> Path:
    return results_dir / "best_text.json"


def is_results_dir(path: Path) -> bool:
    return (path / "metrics").is_dir()


def experiment_results_dirs(path: Path) -> list[Path]:
    """`path` itself when it is one experiment's results folder, else its subfolders that are."""
    if is_results_dir(path):
        return [path]
    return sorted(p for p in path.iterdir() if is_results_dir(p))


def runs_dir_of_results(results_dir: Path) -> Path:
    """`<root>/runs/<experiment>` beside `<root>/results/<experiment>`."""
    return results_dir.parent.parent / "runs" / results_dir.name


# Sung et al.'s study (`vlmerge study`)
def study_experiment(experiment: str, variant: str, seed_epochs: int) -> str:
    """The experiment of one expert run: `<exp>-<variant>-seed<K>`."""
    return f"{experiment}-{variant}-seed{seed_epochs}"


def maa_experiment(experiment: str) -> str:
    """The experiment of the modality-agnostic baseline trained from scratch."""
    return experiment + MAA_SUFFIX
