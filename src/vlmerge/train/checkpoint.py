"""What a run leaves on disk: Hugging Face checkpoints by words seen, and resumable DeepSpeed state.

    runs/<exp>/<run>/checkpoints/words-<12 digits>/   config.json, model.safetensors, tokenizer,
                                                      trainer_state.json, README.md (the model card)
    runs/<exp>/<run>/deepspeed/<tag>/                 module, engine, rank-<r> (JSON + safetensors),
                                                      state.json (our position)
    runs/<exp>/<run>/deepspeed/latest                 the newest complete tag

Both appear complete or not at all: a checkpoint is written to a temp name and renamed; a
resumable state is saved under a temp tag, renamed, and only then named in `latest`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch.distributed as dist
from safetensors import SafetensorError

from vlmerge.card import architecture, render
from vlmerge.errors import VlmergeError
from vlmerge.hf import quiet_transformers
from vlmerge.io import atomic_path, read_json, temp_sibling, write_failure, write_json, write_text
from vlmerge.layout import (LATEST, STATE_ENGINE, STATE_MODULE, STATE_POSITION, checkpoint_dir, is_state_tag,
                            model_card, state_rank_part, state_tag, states_dir)
from vlmerge.model import copy_tokenizer_files
from vlmerge.train.safestate import load_state, rng_state, save_state, set_rng_state

@dataclasses.dataclass
class TrainState:
    """Where a run stands: enough to resume it exactly."""

    epoch: int = 0
    cursor: int = 0
    offset: int = 0
    step: int = 0
    words_seen: int = 0
    tokens_seen: int = 0
    data: str = ""  # digest of every batch so far (vlmerge.data.data_digest)
    loss: float | None = None


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What a run's checkpoints were trained on and from, for their model cards."""

    experiment: str
    sources: tuple[str, ...]  # text, captions
    files: dict[str, list[str]]  # each source's files (BabyLM text files, caption manifests)
    features: str | None  # the image features the captions come with; None for a text-only run
    start: str | None  # the checkpoint the run started from (seed pre-training); None: fresh weights
    init_seed: int


def checkpoint_card(config: dict, state: TrainState, run: str, provenance: Provenance) -> str:
    """The model card of a checkpoint: its run, training data and words seen, and its architecture."""
    p = provenance
    start = f"the checkpoint `{p.start}`" if p.start else f"fresh weights (model.init_seed {p.init_seed})"
    loss = f"{state.loss:.4f}" if state.loss is not None else "none yet (the initialisation)"
    training = (f"- run `{run}` of experiment `{p.experiment}`, started from {start}\n"
                f"- words seen: {state.words_seen:,} ({state.tokens_seen:,} tokens, {state.step} optimizer steps, "
                f"epoch {state.epoch})\n- training loss at this step: {loss}")
    data = "\n".join(f"- {source}: " + (", ".join(f"`{f}`" for f in p.files.get(source, [])) or "none")
                     for source in p.sources)
    if p.features:
        data += f"\n- image features: {p.features}"
    use = ("```python\nimport vlmerge.model  # registers the model with transformers' Auto classes\n"
           "from transformers import AutoModelForImageTextToText\n"
           "model = AutoModelForImageTextToText.from_pretrained(FOLDER)\n```\n\n"
           "`vlmerge export-text FOLDER OUT` writes the language model alone as a `LlamaForCausalLM` folder "
           "(for mergekit, minicons, lm-evaluation-harness).")
    return render(f"{p.experiment} {run} at {state.words_seen:,} words",
                  [("Training", training), ("Training data", data), ("Architecture", architecture(config)),
                   ("Use", use)],
                  tags=["vlmerge", "multimodal" if p.features else "text-only", "babylm"],
                  base_model=[p.start] if p.start else [])


def write_checkpoint(model, tokenizer_dir: Path, run_dir: Path, state: TrainState, run: str,
                     provenance: Provenance) -> Path:
    """Save the model as a Hugging Face directory named by words seen, with its card (no-op if it exists)."""
    out = checkpoint_dir(run_dir, state.words_seen)
    if out.exists():  # a resumed run passing the same point writes the same weights
        return out
    try:
        with atomic_path(out, is_dir=True) as tmp:  # a failed write leaves nothing
            with quiet_transformers():
                model.save_pretrained(tmp)
            copy_tokenizer_files(tokenizer_dir, tmp)
            write_json(tmp / "trainer_state.json", {"run": run, **dataclasses.asdict(state)})
            write_text(model_card(tmp), checkpoint_card(model.config.to_dict(), state, run, provenance))
    except (OSError, SafetensorError) as e:  # a full disk, a quota
        raise VlmergeError(f"{out}: could not write the checkpoint ({write_failure(e)})") from None
    return out


class StateStore:
    """Resumable engine state under `run_dir/deepspeed`, the newest `keep` kept.

    Written by vlmerge itself as JSON + safetensors (`vlmerge.train.safestate`), never with
    DeepSpeed's pickled `.pt` files, so that resuming a copied run directory cannot run code.

    World-size-free: without ZeRO every rank holds the whole optimizer state (fp32, and DeepSpeed's
    fp16/bf16 optimizer with its fp32 master weights), so a state saved by W ranks resumes on any
    number, as long as the global batch (and so the data order and the steps) is the same:
    `train.global_batch`. ZeRO partitions the state over the ranks: it resumes on as many.
    """

    def __init__(self, run_dir: Path, keep: int, rank: int, world: int = 1, global_batch: int | None = None):
        self.root, self.keep, self.rank, self.world = states_dir(run_dir), keep, rank, world
        self.global_batch = global_batch

    def latest(self) -> str | None:
        """The tag named in `latest`, checked to be one of this run's own state folders."""
        path = self.root / LATEST
        if not path.is_file():
            return None
        try:
            tag = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            tag = None
        if tag is None or not is_state_tag(tag) or not (self.root / tag).is_dir():
            raise VlmergeError(f"{path}: names {tag!r}, expected one of this run's state folders "
                               f"(step-<9 digits> in {self.root})")
        return tag

    def save(self, engine, state: TrainState) -> None:
        """Called by every rank at the same step."""
        tag = state_tag(state.step)
        if tag == self.latest():
            return
        names = [temp_sibling(self.root / tag).name if self.rank == 0 else None]
        if dist.is_initialized():  # every rank writes its part into rank 0's temp folder
            dist.broadcast_object_list(names, src=0)
        tmp = self.root / names[0]
        if self.rank == 0:
            tmp.mkdir(parents=True)
        _barrier()
        try:
            save_state(tmp, state_rank_part(self.rank),
                       {"optimizer": engine.optimizer.state_dict(), "rng": rng_state()})
            if self.rank == 0:
                save_state(tmp, STATE_MODULE, engine.module.state_dict())
                save_state(tmp, STATE_ENGINE, {**{k: getattr(engine, k) for k in _ENGINE_COUNTERS},
                                               "lr_scheduler": engine.lr_scheduler.state_dict(), "world": self.world,
                                               "global_batch": self.global_batch})
            _barrier()
            if self.rank == 0:
                write_json(tmp / STATE_POSITION, dataclasses.asdict(state))
                shutil.rmtree(self.root / tag, ignore_errors=True)
                tmp.rename(self.root / tag)
                write_text(self.root / LATEST, tag + "\n")
                self._prune()
        except Exception as e:  # no half-written state stays (the last complete one does)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, SafetensorError)):  # a full disk, a quota
                raise VlmergeError(f"{self.root / tag}: could not write the training state "
                                   f"({write_failure(e)})") from None
            raise
        _barrier()

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if is_state_tag(p.name))
        for old in tags[: -self.keep]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def position(self) -> TrainState | None:
        """Where the newest complete state stands; None when there is none."""
        tag = self.latest()
        if tag is None:
            return None
        path = self.root / tag / STATE_POSITION
        try:
            return TrainState(**read_json(path))
        except (OSError, ValueError, TypeError) as e:
            raise VlmergeError(f"{path}: expected the run's position as JSON ({e})") from None

    def load(self, engine) -> TrainState | None:
        """Restore the engine from the newest complete state; None when there is none."""
        state = self.position()
        if state is None:
            return None
        folder = self.root / self.latest()
        saved = load_state(folder, STATE_ENGINE)
        if not isinstance(saved, dict) or not isinstance(saved.get("world"), int):
            raise VlmergeError(f"{folder / STATE_ENGINE}: expected the engine state that vlmerge writes")
        source = self._source_rank(folder, saved, engine.zero_optimization())
        template = {"optimizer": engine.optimizer.state_dict(), "rng": None}
        mine = load_state(folder, state_rank_part(source), template)
        try:
            engine.module.load_state_dict(load_state(folder, STATE_MODULE))
            if engine.zero_optimization():  # ZeRO wants every rank's partition (same world: _source_rank)
                parts = [mine["optimizer"] if r == self.rank else
                         load_state(folder, state_rank_part(r), template)["optimizer"] for r in range(self.world)]
                engine.optimizer.load_state_dict(state_dict_list=parts, load_optimizer_states=True,
                                                 load_from_fp32_weights=engine.zero_load_from_fp32_weights())
            elif engine.fp16_enabled() or engine.bfloat16_enabled():
                engine.optimizer.load_state_dict(mine["optimizer"], load_optimizer_states=True)
            else:
                engine.optimizer.load_state_dict(mine["optimizer"])
            engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
            for k in _ENGINE_COUNTERS:
                setattr(engine, k, int(saved[k]))
            if saved["world"] != self.world:  # micro-batches per step differ: keep steps on the boundary
                engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
            set_rng_state(mine["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise VlmergeError(f"{folder}: training state does not fit this run's model and optimizer "
                               f"({first.strip()})") from None
        return state


    def _source_rank(self, folder: Path, saved: dict, zero: bool) -> int:
        """The saved rank whose part this rank loads: its own, or, on another number of ranks, one
        that holds the whole (replicated) optimizer state; one-line errors where it cannot be."""
        was = saved["world"]
        if was == self.world:
            return self.rank
        if zero:
            raise VlmergeError(f"{folder}: saved by {was} rank(s) with ZeRO, which partitions the optimizer state "
                               f"over the ranks; resume it on {was} (now {self.world}), or train with zero_stage 0")
        batch = saved.get("global_batch")
        if batch != self.global_batch:
            raise VlmergeError(f"{folder}: saved by {was} rank(s) with a global batch of {batch} examples; on "
                               f"{self.world} rank(s) it would be {self.global_batch}: set train.global_batch when a "
                               f"run starts to resume it on another number of ranks (now resume on {was})")
        # Every rank of a replicated state holds the same optimizer state; its RNG state then comes
        # from the saved rank of the same number, or from rank 0.
        return self.rank if self.rank < was else 0


_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
