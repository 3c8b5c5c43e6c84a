"""What a run leaves on disk: Hugging Face checkpoints by words seen, and resumable DeepSpeed state.

    runs/<exp>/<run>/checkpoints/words-<12 digits>/   config.json, model.safetensors, tokenizer,
                                                      trainer_state.json
    runs/<exp>/<run>/deepspeed/<tag>/                 DeepSpeed's files + state.json (our position)
    runs/<exp>/<run>/deepspeed/latest                 the newest complete tag

Both appear complete or not at all: a checkpoint is written to a temp name and renamed; a
DeepSpeed state is saved under a temp tag, renamed, and only then named in `latest`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch.distributed as dist

from vlmerge.hf import quiet_transformers
from vlmerge.io import atomic_path, file_sha256, read_json, write_json, write_text
from vlmerge.layout import checkpoint_dir, is_state_tag, state_tag, states_dir
from vlmerge.model import copy_tokenizer_files

@dataclasses.dataclass
class TrainState:
    """Where a run stands: enough to resume it exactly."""

    epoch: int = 0
    cursor: int = 0
    offset: int = 0
    step: int = 0
    words_seen: int = 0
    tokens_seen: int = 0
    loss: float | None = None


def write_checkpoint(model, tokenizer_dir: Path, run_dir: Path, state: TrainState, run: str) -> Path:
    """Save the model as a Hugging Face directory named by words seen (no-op if it exists)."""
    out = checkpoint_dir(run_dir, state.words_seen)
    if out.exists():  # a resumed run passing the same point writes the same weights
        return out
    with atomic_path(out, is_dir=True) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp)
        file_sha256(tmp / "model.safetensors")  # cached beside it: merges record it without rereading
        copy_tokenizer_files(tokenizer_dir, tmp)
        write_json(tmp / "trainer_state.json", {"run": run, **dataclasses.asdict(state)})
    return out


class StateStore:
    """DeepSpeed engine state under `run_dir/deepspeed`, the newest `keep` kept."""

    def __init__(self, run_dir: Path, keep: int, rank: int):
        self.root, self.keep, self.rank = states_dir(run_dir), keep, rank

    def latest(self) -> str | None:
        path = self.root / "latest"
        return path.read_text().strip() if path.is_file() else None

    def save(self, engine, state: TrainState) -> None:
        """Called by every rank at the same step."""
        tag = state_tag(state.step)
        if tag == self.latest():
            return
        tmp_tag = f".tmp-{tag}"
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        if self.rank == 0:
            write_json(self.root / tmp_tag / "state.json", dataclasses.asdict(state))
            shutil.rmtree(self.root / tag, ignore_errors=True)
            (self.root / tmp_tag).rename(self.root / tag)
            write_text(self.root / "latest", tag + "\n")
            self._prune()
        if dist.is_initialized():
            dist.barrier()

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if is_state_tag(p.name))
        for old in tags[: -self.keep]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-*"):  # left by a run killed mid-save
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, engine) -> TrainState | None:
        """Restore the engine from the newest complete state; None when there is none."""
        tag = self.latest()
        if tag is None:
            return None
        engine.load_checkpoint(str(self.root), tag=tag)
        return TrainState(**read_json(self.root / tag / "state.json"))
