"""Typed experiment config: YAML + dotted overrides -> validated `Config`.

pydantic models with `extra="forbid"` give us validation, defaults and the list of allowed
keys for free; `load_config` turns its errors into one line that names the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)

from vlmerge.device import DEVICE_RULE, check_device_spec
from vlmerge.errors import VlmergeError
from vlmerge.io import write_text
from vlmerge.layout import Layout

DEMO_CONFIG = "demo.yaml"
RUN_NAMES = ("seed", "text", "multimodal", "experts")
EXPERT_RUN = "experts"


class ConfigError(VlmergeError):
    """A config file or override that does not validate."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SAFE_NAME_RULE = "a plain name: letters, digits, '.', '_', '-', not starting with '.' or '-' (it names folders)"


def _safe_name(v: str) -> str:
    """`v` when it is usable as one path component under the output root; else ValueError."""
    if not _SAFE_NAME.fullmatch(v) or v in (".", ".."):
        raise ValueError(f"must be {SAFE_NAME_RULE}")
    return v


def _auto_or_positive(v: int | str) -> int | str:
    """`v` when it is "auto" or a whole number of at least 1; else ValueError."""
    if v != "auto" and v < 1:
        raise ValueError("expected auto or a whole number, at least 1")
    return v


def alpha_problem(alphas: Sequence[float], allow_extrapolation: bool) -> str | None:
    """What is wrong with a list of merge weights α (None when nothing is): the one rule of config and CLI."""
    if not alphas:
        return "no alpha given; expected at least one value in [0, 1]"
    for a in alphas:
        if not math.isfinite(a):
            return f"alpha {a} is not a finite number"
        if not allow_extrapolation and not 0.0 <= a <= 1.0:
            return f"alpha {a} is outside [0, 1]; allow extrapolation to use it"
    if len(set(alphas)) != len(alphas):
        dup = next(a for a in alphas if list(alphas).count(a) > 1)
        return f"alpha {dup} is given twice; each alpha once"
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    root: str = "outputs"

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.strip():  # `{root}/demo` would become `/demo`
            raise ValueError("expected the output folder, not an empty path")
        return v


class DemoConfig(_Section):
    """Parameters of the built-in demo world (`vlmerge demo-data`)."""

    out: str = "{root}/demo"
    seed: int = 0
    text_words: int = Field(80_000, ge=1000)
    n_images: int = Field(7500, ge=10, description="one caption each: about as many caption words as text words")
    n_winoground: int = Field(150, ge=1, description="also the number of VQA questions")
    pairs_per_phenomenon: int = Field(150, ge=1)


class DataConfig(_Section):
    """Training text: BabyLM `.train` files (one utterance per line) and caption manifests."""

    text: list[str] = []
    dev_text: list[str] = Field(
        [], description="text files of the validation split: counted by `vlmerge corpus`, not trained on")
    captions: list[str] = []
    dev_captions: list[str] = Field(
        [], description="caption manifests of the validation split: counted by `vlmerge corpus`, not trained on")

    @model_serializer(mode="wrap")
    def _leave_out_empty_dev_captions(self, handler):
        # dev_captions came later: left out when empty, configs and run fingerprints (which hold the data
        # section) stay as they were.
        out = handler(self)
        if not self.dev_captions:
            out.pop("dev_captions", None)
        return out


class TokenizerConfig(_Section):
    """The BPE tokenizer trained on the experiment's text (`vlmerge tokenizer`)."""

    recipe: Literal["bytelevel", "llava_bpe"] = Field(
        "bytelevel", description="bytelevel: byte-level BPE, a space marker on word-initial tokens (GPT-2); "
                                 "llava_bpe: BPE over a BERT pre-tokenizer (whitespace and punctuation), an unknown "
                                 "token for unseen characters (Takmaz et al. 2025)")
    vocab_size: int = Field(16_000, ge=300, description="tokens, the special ones included")
    min_frequency: int = Field(2, ge=1)
    image_token: str = "<image>"
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    unk_token: str = Field("<unk>", description="llava_bpe only: the token of a character never seen in training")

    def identity(self) -> dict:
        """What makes the tokenizer what it is (the byte-level recipe's settings as they were before
        there were recipes, so that its tokenizers and runs keep their fingerprints)."""
        return self.model_dump(exclude={"recipe", "unk_token"} if self.recipe == "bytelevel" else None)


class CorpusConfig(_Section):
    shard_samples: int = Field(1_000_000, ge=1, description="samples per token shard")


class ImageSource(_Section):
    """One image manifest: JSONL {image_id, path, caption}, BabyLM caption JSON + image folder, or the
    DevBench folder (its tasks' manifests; `manifest` is the folder)."""

    manifest: str
    format: Literal["jsonl", "babylm", "devbench"] = "jsonl"
    images_dir: str | None = None


class NpyImport(_Section):
    """Precomputed features of the BabyLM release: caption JSON + row-aligned `.npy` parts.

    The release's vectors may come from another DINOv2 than the local encoder: an import declares
    where they come from, and its black-image row (`null_feature`: a `.npy` of shape [D], or
    "black" for the local encoder's, allowed only when the provenance is the local encoder's).
    """

    captions: str
    npy: list[str] = Field(min_length=1)
    prefix: str
    encoder: str = Field(description="the encoder that made the vectors (e.g. facebook/dinov2-large)")
    layer: int = Field(description="its hidden-state layer (e.g. -2)")
    pooling: Literal["mean_patch", "cls", "mean_all"]
    null_feature: str = Field("black", description='"black" (the local encoder\'s) or a .npy file of shape [D]')

    _prefix = field_validator("prefix")(classmethod(lambda cls, v: _safe_name(v)))


class FeaturesConfig(_Section):
    name: str = "features"
    encoder: str = "facebook/dinov2-large"
    revision: str | None = None
    layer: int = -2
    pooling: Literal["mean_patch", "cls", "mean_all"] = "mean_patch"
    images: list[ImageSource] = []
    imports: list[NpyImport] = []
    grid: int = Field(1, ge=1, description="keep a G×G grid of patch means per image ([N, G², D]; the model then "
                                           "takes G² image tokens); 1: the paper's single vector")
    dtype: Literal["float16", "float32"] = "float16"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str = Field("auto", description=f"the encoder's device: {DEVICE_RULE}")
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    num_shards: int = Field(1, ge=1)
    # PIL's own bound (Image.MAX_IMAGE_PIXELS); PIL refuses any image of more than twice it.
    max_image_pixels: int = Field(
        89_478_485, ge=1, le=2 * 89_478_485,
        description="an image whose header declares more pixels (width × height) is not decoded: a broken image, "
                    "recorded and counted (a small file can declare a huge image, and decoding it takes gigabytes)")

    _name = field_validator("name")(classmethod(lambda cls, v: _safe_name(v)))
    _device = field_validator("device")(classmethod(lambda cls, v: check_device_spec(v)))

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: int, info: ValidationInfo) -> int:  # after pooling and imports: they are checked first
        if v > 1 and info.data.get("pooling", "mean_patch") != "mean_patch":
            raise ValueError(f"a grid of {v}×{v} cells needs pooling: mean_patch (each cell is a mean of patch "
                             f"tokens), not {info.data['pooling']}")
        if v > 1 and info.data.get("imports"):
            raise ValueError("a grid cannot take features.imports (the release's vectors are single pooled "
                             "vectors); use grid: 1 or drop the imports")
        return v


class ModelConfig(_Section):
    """The Llama-style language model inside the LLaVA-style model."""

    num_layers: int = Field(6, ge=1)
    hidden_size: int = Field(768, ge=8)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=8)
    max_length: int = Field(128, ge=8)
    vocab_size: int | None = Field(
        None, ge=8, description="rows of the embedding and the output layer, the tokenizer's tokens first and "
                                "the rest never seen (a corpus whose tokenizer stops short of the paper's "
                                "vocabulary keeps its shapes); None: the tokenizer's size")
    init_seed: int = 0
    experts: Literal["none", "all", "attention", "ffn", "layernorm"] = Field(
        "none", description="modality experts (Sung et al. 2023): which modules keep per-modality weights")
    cross_modal_layers: int = Field(0, ge=0, description="top layers with a cross-modal expert (experts only)")

    @model_validator(mode="after")
    def _cross_modal_within_the_layers(self) -> "ModelConfig":
        if self.cross_modal_layers > self.num_layers:
            raise ValueError(f"cross_modal_layers ({self.cross_modal_layers}) exceeds num_layers ({self.num_layers})")
        return self

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_the_width(cls, v: int, info: ValidationInfo) -> int:  # after hidden_size: checked first
        width = info.data.get("hidden_size")
        if width is not None and width % v:
            raise ValueError(f"must divide hidden_size ({width}): each attention head takes an equal share of it")
        return v


class TrainConfig(_Section):
    """Optimisation and DeepSpeed settings shared by every run of the experiment."""

    epochs: int = Field(10, ge=1)
    micro_batch_size: int = Field(32, ge=1, description="examples per rank per forward")
    grad_accum: int = Field(1, ge=1, description="micro-batches per rank per step, when global_batch is not set")
    global_batch: int | None = Field(None, ge=1, description="examples per optimizer step, on any number of ranks: "
                                     "grad_accum = global_batch / (micro_batch_size × ranks), so that a run resumes "
                                     "on another number of GPUs with the same batches (null: micro_batch_size × "
                                     "grad_accum × ranks)")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2] = 0
    seed: int = Field(0, description="data order seed: epoch e is permuted by (seed, e)")
    log_every: int = Field(10, ge=1)
    check_replicas: bool = Field(False, description="compare weight checksums across ranks after every step")
    deepspeed: dict[str, Any] = Field({}, description="raw DeepSpeed config merged over the generated one")
    monitor: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"], description="live training curves, the rows of the run's metrics log mirrored under the run "
        "folder by rank 0: tensorboard (event files), wandb (a W&B offline run, for `wandb sync`; wandb must be installed)")

    @field_validator("monitor")
    @classmethod
    def _monitors_once(cls, v: list[str]) -> list[str]:
        if repeated := [m for i, m in enumerate(v) if m in v[:i]]:
            raise ValueError(f"{repeated[0]!r} is given twice: list each monitor once")
        return v


class CheckpointConfig(_Section):
    """When to save Hugging Face checkpoints (by words seen) and resumable DeepSpeed state."""

    words: Literal["babylm"] | list[int] = "babylm"
    every_epoch: bool = True
    keep_states: int = Field(2, ge=1, description="DeepSpeed states kept (newest first)")
    state_every_steps: int = Field(1000, ge=1)

    @field_validator("words")
    @classmethod
    def _words_increase(cls, v: Literal["babylm"] | list[int]) -> Literal["babylm"] | list[int]:
        if isinstance(v, list):
            if nonpositive := [w for w in v if w <= 0]:
                raise ValueError(f"{nonpositive[0]} is not a positive word count (the initial weights are saved "
                                 "anyway)")
            if unsorted := [b for a, b in zip(v, v[1:]) if b <= a]:
                raise ValueError(f"{unsorted[0]} does not follow a smaller count: list the word counts in "
                                 "increasing order, each once")
        return v


class RunConfig(_Section):
    sources: list[Literal["text", "captions"]] = Field(min_length=1)
    epochs: int | None = Field(None, ge=1, description="default: train.epochs")


class RunsConfig(_Section):
    """The twins, the optional seed run they start from (Sung et al.'s seed pre-training), and the
    modality-expert run (`model.experts`), which starts from the seed run too when it is on."""

    seed_pretraining: bool = False
    seed: RunConfig = RunConfig(sources=["text", "captions"], epochs=1)
    text: RunConfig = RunConfig(sources=["text"])
    multimodal: RunConfig = RunConfig(sources=["text", "captions"])
    experts: RunConfig = RunConfig(sources=["text", "captions"])


class MethodSpec(_Section):
    """A merge method with fixed parameters, and a grid whose every combination is swept."""

    name: str
    params: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}


class ExportSpec(_Section):
    """Merges of the sweep whose predictions are also written for a BabyLM submission."""

    method: str
    alpha: float
    params: dict[str, Any] | None = Field(None, description="the method's parameters (default: any)")
    words: int | None = Field(None, description="the multimodal checkpoint's words seen (default: every pair)")

    def selects(self, method: str, params: dict[str, Any], alpha: float, words: int) -> bool:
        return (method == self.method and abs(alpha - self.alpha) < 1e-9
                and self.params in (None, params) and self.words in (None, words))


class FinetuneSpec(_Section):
    """Merges of the sweep that are also fine-tuned (finetune.*), beside the twins of their pairs."""

    method: str
    alpha: float | Literal["best"] = Field(description='an α of sweep.alphas, or "best": per pair, the analysis\'s '
                                                       "best α (analysis.tolerance) on the first of analysis.text_tasks")
    params: dict[str, Any] | None = Field(None, description="the method's parameters (default: any)")
    words: int | None = Field(None, description="the multimodal checkpoint's words seen (default: the last pair's)")
    tasks: list[str] = Field([], description="tasks of finetune.tasks (default: all of them)")


class SweepConfig(_Section):
    allow_extrapolation: bool = Field(False, description="allow alphas outside [0, 1]")  # before alphas: checked first
    alphas: list[float] = [round(0.1 * i, 1) for i in range(11)]
    methods: list[MethodSpec] = [MethodSpec(name="linear")]
    pairing: Literal["same_words", "best_text", "all_pairs"] = "same_words"
    best_text_task: str = Field("blimp", description="best_text: the task whose mean accuracy picks the text checkpoint")
    best_text_data: str | None = Field(None, description="best_text: the data of best_text_task that picks it (default: "
                                                         "its eval.tasks path); Takmaz et al. pick on the full BLiMP "
                                                         "while the sweep scores the fast sets")
    tasks: list[str] = Field([], description="tasks of eval.tasks to run (default: all)")
    distances: bool = True
    statistics_batches: int = Field(16, ge=1, description="batches of its own data each model sees for the data "
                                    "statistics of RegMean (Grams) and Fisher merging")
    array_throttle: int = Field(8, ge=1, description="array tasks running at once (the sbatch %% limit)")
    probe: bool = Field(False, description="the mergeability probe's signals (task 'probe') of every merge and twin")
    probe_lines: int = Field(256, ge=2, description="dev lines, and captions, the probe's losses are taken on")
    search: Literal["grid", "adaptive"] = Field(
        "grid", description="grid: evaluate every α; adaptive: probe every α, evaluate the α the probe predicts best "
                            "(analysis.tolerance) and its neighbours, refine (the probe is on)")
    search_task: str = Field("blimp", description="adaptive: the text task ([task/subtask], its analysis.text_tasks "
                                                  "metric) whose best α the search looks for")
    search_budget: float = Field(0.4, gt=0, le=1, description="adaptive: evaluations (a share of the grid) past which "
                                                              "only the measured best's neighbours are evaluated")
    export_babylm: list[ExportSpec] = Field(
        [], description="merges whose predictions are written in BabyLM's submission layout, under "
                        "results/<exp>/babylm/<model>/main")
    finetune: list[FinetuneSpec] = Field(
        [], description="merges fine-tuned after the sweep (vlmerge sweep finetune: one array item per model and "
                        "task), the twins of their pairs always with them")

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float], info: ValidationInfo) -> list[float]:
        problem = alpha_problem(v, bool(info.data.get("allow_extrapolation")))
        if problem:
            raise ValueError(problem.replace("allow extrapolation", "set sweep.allow_extrapolation=true"))
        return v


class EvalConfig(_Section):
    """Evaluation: task name -> data path, and how models are scored."""

    tasks: dict[str, str] = {}
    features: str | None = Field(None, description="feature store of the evaluation images (default: features.name's)")
    prompt: Literal["auto", "takmaz2025", "text", "legacy"] = Field(
        "auto", description="takmaz2025: '<image> ' + sentence (null image for text tasks); text: the sentence alone; "
                            "legacy: BOS + <image>, context and target tokenised apart; auto: takmaz2025 for a "
                            "model with an image token, else text")
    dtype: Literal["fp32", "bf16"] = "fp32"
    batch_size: int | Literal["auto"] = Field("auto", description="requests per batch at most; auto: 64 on the CPU, "
                                                                  "no limit but batch_tokens on a GPU")
    batch_tokens: int | Literal["auto"] = Field(
        "auto", description="padded tokens (rows × the longest row) per batch at most, a larger item alone; auto: "
                            "16384 on the CPU, 65536 on a GPU")
    share_prefix: bool = Field(True, description="the candidates of an item (same image) share one row: their "
                                                 "common token prefix computed once; the same scores up to rounding")
    max_tokens: int = Field(4096, ge=1, description="the longest sequence scored; an item with a longer one is a "
                                                    "counted problem, left out. A memory guard (attention grows with "
                                                    "the square of the length): the official pipeline scores every "
                                                    "item whole, so keep it above the data's longest")

    _batch = field_validator("batch_size", "batch_tokens")(classmethod(lambda cls, v: _auto_or_positive(v)))


class TaskRecipe(_Section):
    """One task's own fine-tuning hyperparameters (Sung et al.'s Table 6 gives one per task); an
    unset field keeps finetune's."""

    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    warmup_proportion: float | None = Field(None, ge=0, le=1)
    weight_decay: float | None = Field(None, ge=0)


class FinetuneConfig(_Section):
    """(Super)GLUE fine-tuning: BabyLM 2025's recipe, its defaults those of eval_finetuning.sh and
    evaluation_pipeline/finetune/run.py."""

    tasks: dict[str, str] = Field({}, description="task (boolq, cola, mnli, mrpc, multirc, qnli, qqp, rte, sst2, wsc) "
                                                  "-> the folder of its <task>.train.jsonl and <task>.valid.jsonl "
                                                  "(BabyLM's glue_filtered)")
    lr: float = Field(3e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    big_batch_size: int = Field(16, ge=1, description="the batch of boolq and multirc")
    epochs: int = Field(10, ge=1)
    wsc_epochs: int = Field(30, ge=1, description="the epochs of wsc")
    seed: int = 42
    max_length: int = Field(512, ge=2, description="tokens of an input at most (truncated beyond)")
    valid_batch_size: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1, description="the classifier head's")
    layer_norm_eps: float = Field(1e-5, gt=0, description="the classifier head's")
    weight_decay: float = Field(0.01, ge=0)
    warmup_proportion: float = Field(0.06, ge=0, le=1)
    min_factor: float = Field(0.1, ge=0, le=1, description="cosine decay to lr * min_factor")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    padding_side: Literal["left", "right"] = Field(
        "left", description="the head reads the last real token on either side; left is the pipeline's setting "
                            "for decoders (--padding_side left --take_final)")
    vqa_min_answer_count: int = Field(9, ge=1, description="ft_vqa: the answers of the classifier, those the training "
                                                           "split gives as the major answer this often (ViLT's 9)")
    recipes: dict[str, TaskRecipe] = Field({}, description="task -> its own lr, batch_size, epochs, warmup_proportion, "
                                                           "weight_decay (over the common recipe and the task's "
                                                           "big-batch / long-schedule choice)")


class AnalysisConfig(_Section):
    """Offline analysis: the metric that scores each task, and what "keeps grounding" means."""

    text_tasks: dict[str, str] = Field(
        {"blimp": "accuracy", "blimp_supplement": "accuracy", "ewok": "accuracy", "entity_tracking": "accuracy",
         "comps": "accuracy", "wug_adj": "spearman", "wug_past": "spearman", "reading": "eye_tracking",
         "perplexity": "logprob_per_token"},
        description="language tasks (the text twin's strength) -> the metric that scores them")
    multimodal_tasks: dict[str, str] = Field(
        {"winoground": "unpaired_accuracy", "winoground_full": "unpaired_accuracy", "vqa": "accuracy"},
        description="grounding tasks (the multimodal twin's strength) -> the metric that scores them")
    tolerance: float = Field(0.02, ge=0, description="best alpha: the largest multimodal drop allowed (score units)")
    alpha: float = Field(0.5, description="the alpha of the distance-against-drop figures")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of the per-item scores (0: no intervals)")
    seed: int = 0
    figures: Literal["png", "interactive", "both"] = Field(
        "both", description="png: PNGs under figures/, embedded in report.html; interactive: report.html draws one "
                            "interactive view per figure kind, no PNGs; both: the interactive views, and the PNGs "
                            "under figures/ for papers")


class ComputeConfig(_Section):
    """How a process uses the machine."""

    threads: int = Field(0, ge=0, description="CPU threads per process (0: the CPUs it may use: its affinity "
                                              "mask, SLURM_CPUS_PER_TASK where smaller)")
    device: str = Field("auto", description=f"where eval, sweep, study, statistics and distance run models: {DEVICE_RULE} "
                                            "(auto: the GPU when one is visible)")
    workers: int | Literal["auto"] = Field(
        "auto", description="`vlmerge sweep run` outside an array task: worker processes, each with its share of the "
                            "items; auto: one per visible GPU (each sees only its own), 1 on the CPU")

    _device = field_validator("device")(classmethod(lambda cls, v: check_device_spec(v)))
    _workers = field_validator("workers")(classmethod(lambda cls, v: _auto_or_positive(v)))


class StudyConfig(_Section):
    """Sung et al.'s study on one world (`vlmerge study`): seed length, expert variants, merge grids.

    Every expert run trains `total_epochs`: K_seed agnostic seed epochs, then the rest with experts
    (K_seed = 0: no seed, the merging baseline MB). The agnostic baseline (MAA) trains the
    multimodal run from scratch for `total_epochs`.
    """

    total_epochs: int = Field(3, ge=2)
    seed_epochs: list[int] = Field([0, 1, 2], min_length=1, description="the K_seed grid (epochs)")
    variants: list[Literal["all", "attention", "ffn", "layernorm"]] = ["all", "attention", "ffn", "layernorm"]
    variant_seed_epochs: int = Field(1, ge=0, description="K_seed of the variant comparison")
    cross_modal_layers: int = Field(1, ge=0)
    alphas: list[float] = Field([0.5, 0.75], min_length=1, description="interpolation and RegMean: vision weight")
    lams: list[float] = Field([0.5, 1.0], min_length=1, description="modality arithmetic: λ")
    gammas: list[float] = Field([0.5, 0.9], min_length=1, description="RegMean: γ")
    tasks: list[str] = Field([], description="tasks of eval.tasks to run (default: all)")
    finetune: list[str] = Field([], description="tasks of finetune.tasks each studied model is also fine-tuned on, "
                                                "after its zero-shot evaluation (Sung et al.'s protocol: pre-train, "
                                                "merge, fine-tune)")

    @model_validator(mode="after")
    def _seeds_within_the_budget(self) -> "StudyConfig":
        bad = [k for k in [*self.seed_epochs, self.variant_seed_epochs] if not 0 <= k < self.total_epochs]
        if bad:
            raise ValueError(f"seed epochs {bad[0]} outside [0, total_epochs) = [0, {self.total_epochs})")
        return self


class Config(_Section):
    experiment: str = "demo"

    _experiment = field_validator("experiment")(classmethod(lambda cls, v: _safe_name(v)))
    paths: PathsConfig = PathsConfig()
    demo: DemoConfig = DemoConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    corpus: CorpusConfig = CorpusConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    checkpoints: CheckpointConfig = CheckpointConfig()
    runs: RunsConfig = RunsConfig()
    sweep: SweepConfig = SweepConfig()
    eval: EvalConfig = EvalConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    study: StudyConfig = StudyConfig()
    compute: ComputeConfig = ComputeConfig()

    @property
    def root(self) -> Path:
        return Path(self.paths.root)

    @property
    def layout(self) -> Layout:
        """Where this experiment's files live under the output root."""
        return Layout(self.root, self.experiment)

    @property
    def store_path(self) -> Path:
        """The feature store of `features.name`."""
        return self.layout.store(self.features.name)

    @property
    def eval_store_path(self) -> Path:
        """The feature store of the evaluation images: eval.features, else the training store."""
        return Path(self.eval.features) if self.eval.features else self.store_path

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def hash(self) -> str:
        """A short stable hash of the resolved config."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:12]


def task_paths(given: Sequence[str], configured: dict[str, str], key: str) -> list[tuple[str, Path]]:
    """(name, path) of `--task NAME` (its path from the config section `key`, `configured`) or
    `--task NAME=PATH`; none given: every task of the section."""
    out = []
    for spec in given or list(configured):
        name, _, path = spec.partition("=")
        if not path:
            if name not in configured:
                raise VlmergeError(f"--task {name}: no path given and {key} has none for it")
            path = configured[name]
        out.append((name, Path(path)))
    if not out:
        raise VlmergeError(f"no tasks: give --task NAME[=PATH] or set {key} in the config")
    return out


def default_config_path() -> Path:
    """The embedded demo config shipped inside the package."""
    return Path(str(resources.files("vlmerge.configs").joinpath(DEMO_CONFIG)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.lr=3e-4")
    return key.split("."), parse_value(value, f"override {text!r}") if value else ""


# A number in exponent notation without a dot (`3e-4`), which YAML 1.1 (PyYAML) reads as a string.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(value: str, where: str) -> Any:
    """A command-line value read as YAML (`3e-4`, `[0, 0.5]`, `{a: 1}`); one line naming `where` when it is not YAML."""
    if _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None


def apply_override(raw: dict, keys: list[str], value: Any) -> None:
    """Set raw[k0][k1]... = value, creating sections that are missing."""
    node = raw
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def merge_dicts(base: dict, top: dict) -> dict:
    """`top` over `base`, recursively for mappings (lists and values are replaced); a key that `top`
    sets to null is dropped from `base`'s, so that an overlay removes an entry (a task of eval.tasks)
    or gives a setting back its default."""
    out = dict(base)
    for k, v in top.items():
        if v is None and k in base:
            del out[k]
        else:
            out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _expand(node: Any, names: dict[str, str]) -> Any:
    """Replace {root} and {experiment} in every string of the raw config."""
    if isinstance(node, str):
        for k, v in names.items():
            node = node.replace("{" + k + "}", v)
        return node
    if isinstance(node, list):
        return [_expand(x, names) for x in node]
    if isinstance(node, dict):
        return {k: _expand(v, names) for k, v in node.items()}
    return node


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (the section that holds the offending key)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif field and getattr(ann, "__args__", None):
            # list[ImageSource] and similar: descend into the item model.
            inner = [a for a in ann.__args__ if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner:
                model = inner[0]
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(Config, loc))
        msg = f"unknown key {key!r}; allowed here: {allowed}"
    else:
        msg = f"{key}: {first['msg']} (got {first.get('input')!r})"
    more = len(err.errors()) - 1
    return f"{source}: {msg}" + (f" (+{more} more)" if more else "")


def read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, over the file it `extends` (a path relative to it), recursively."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a YAML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected the path of the config this one overlays, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: extends {base}: a loop of configs extending each other")
    return merge_dicts(read_raw(base_path, (*seen, path.resolve())), raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (the embedded demo config when `path` is None), over the config it
    `extends` if it names one, and apply overrides."""
    path = Path(path) if path is not None else default_config_path()
    raw = read_raw(path)
    # Start from the defaults, so that an override may set one field of a section the file omits.
    raw = merge_dicts(Config().model_dump(mode="json"), raw)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    paths = raw.get("paths") or {}
    names = {
        "root": str(paths.get("root", PathsConfig().root)) if isinstance(paths, dict) else "",
        "experiment": str(raw.get("experiment", Config().experiment)),
    }
    try:
        return Config.model_validate(_expand(raw, names))
    except ValidationError as e:
        source = f"{path} (with overrides)" if overrides else str(path)
        raise ConfigError(_one_line(e, source)) from None


def save_resolved(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically) beside an output."""
    write_text(path, cfg.to_yaml())
