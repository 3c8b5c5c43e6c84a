"""`train.monitor`: live training curves, for TensorBoard and W&B (offline), mirrored from metrics.jsonl.

metrics.jsonl is the record; each monitor is a view of it, written by rank 0 alone. A training that
starts again (a requeue, a rerun after a kill) first rewrites every view from the rows metrics.jsonl
keeps, then logs on: a view holds each logged step once, with metrics.jsonl's values, whatever the
killed process had logged past its saved state or had not yet flushed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError
from vlmerge.layout import run_tensorboard_dir, run_wandb_dir, tensorboard_event_files, wandb_offline_runs

# Not curves: the x axis (the step) and the wall time of the row.
NOT_SCALARS = ("step", "time")


def scalars(row: dict) -> dict[str, float]:
    """The curves of a metrics.jsonl row: its numbers, under their own names (digests are no curves)."""
    return {k: v for k, v in row.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_monitors(kinds: Sequence[str]) -> None:
    """Refuse, before training, a monitor that cannot run here."""
    if "wandb" in kinds:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise VlmergeError(f"train.monitor: wandb cannot be imported ({str(e).strip() or type(e).__name__}): "
                               "install it (pip install wandb) or leave it out of train.monitor") from None


class _TensorBoard:
    """The run's TensorBoard folder: one event file, rewritten at each start."""

    def __init__(self, run_dir: Path, logged: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_tensorboard_dir(run_dir)
        earlier = tensorboard_event_files(folder)
        # purge_step 0: a TensorBoard already showing the earlier files drops every step it read from
        # them when it reaches this file, which holds them all again.
        self.writer = SummaryWriter(str(folder), purge_step=0)
        for row in logged:
            self._add(row)
        self.writer.flush()
        # Only once the rewrite is on disk: killed before, the next start rewrites again.
        for path in earlier:
            path.unlink(missing_ok=True)

    def _add(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, row["step"], walltime=row.get("time"))

    def log(self, row: dict) -> None:
        self._add(row)
        self.writer.flush()  # live: a viewer sees each row as it is logged

    def close(self, failed: bool) -> None:
        self.writer.close()


class _Wandb:
    """A W&B offline run (never online: no network on compute nodes), rewritten at each start."""

    def __init__(self, run_dir: Path, logged: list[dict], project: str, name: str, config: dict[str, Any]):
        import wandb

        earlier = wandb_offline_runs(run_wandb_dir(run_dir))
        try:
            # mode="offline" wins over WANDB_MODE; console off: our stdout and stderr stay ours.
            self.run = wandb.init(mode="offline", dir=run_dir, project=project, name=name, config=config,
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # W&B reports a failed start with many exception types
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise VlmergeError(f"train.monitor: wandb could not start an offline run in {run_wandb_dir(run_dir)}: "
                               f"{first.strip()}") from None
        for row in logged:
            self.log(row)
        # The new run holds every row of the earlier ones that metrics.jsonl kept: one run to sync.
        for path in earlier:
            shutil.rmtree(path, ignore_errors=True)

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a stopped or crashed training as failed


class Monitor:
    """The chosen views of metrics.jsonl (none on ranks other than 0), each first rewritten from the
    rows `logged` so far; `log` mirrors each new row."""

    def __init__(self, kinds: Sequence[str], run_dir: Path, logged: list[dict], *, project: str, name: str,
                 config: dict[str, Any]):
        self._views: list[_TensorBoard | _Wandb] = []
        try:
            for kind in kinds:  # the config's names: tensorboard, wandb
                self._views.append(_TensorBoard(run_dir, logged) if kind == "tensorboard"
                                   else _Wandb(run_dir, logged, project, name, config))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, row: dict) -> None:
        for view in self._views:
            view.log(row)

    def close(self, failed: bool = False) -> None:
        for view in self._views:
            view.close(failed)
        self._views = []

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)
