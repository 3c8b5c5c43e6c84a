"""`vlmerge status`: how far the sweep is, which items failed and why, and when it will end.

Each item of the plan is in one state:

    done       its metrics are written (`finished`: a file of its own, or rows of a compacted file)
    running    its array task runs (`squeue`)
    pending    its array task waits in the queue
    failed     not done, not queued, and the newest log of its array task failed: an error line in the
               log, or a failed state in `sacct` where the cluster keeps accounting
    not queued the rest: not started, or stopped without a word (without Slurm: "not done", since
               running and waiting items cannot be told apart)

Item k of the plan is array task k // P (P items per task, the layout `sweep plan --array` gives
jobs/pipeline.sh), whose log is `<root>/logs/<exp>/vlmerge-sweep-<array job>_<task>.out`. The
command line asks Slurm (`vlmerge.launch`) and passes the answers here.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from pathlib import Path

from vlmerge.config import Config
from vlmerge.errors import VlmergeError
from vlmerge.results import finish_times
from vlmerge.sweep.commands import current_plan
from vlmerge.sweep.estimate import hours
from vlmerge.sweep.plan import WorkItem, array_layout
from vlmerge.sweep.run import finished, kept_best_text

# A line that says a job failed: our one-line errors, a Python traceback's last line, Slurm's and the shell's.
ERROR_LINE = re.compile(r"^(?:vlmerge [\w-]+: (?:error|interrupted)\b|srun: error:|slurmstepd: error:|Traceback |"
                        r"(?:[A-Za-z_][\w.]*)?(?:Error|Exception|Interrupt)\b)|\bKilled\b|Segmentation fault")
SRUN_EXIT = re.compile(r"srun: error: \S+: task \d+: ")  # srun's echo of the exit: the job's own words say more
TAIL_BYTES = 1 << 16  # a failure's words are at the end of its log


def failure_line(log: Path) -> str | None:
    """Why the job of `log` failed: its last error line, srun's echo of the exit only where the job
    said nothing itself; None when no line of its end is an error."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - TAIL_BYTES))
        tail = f.read().decode(errors="replace")
    errors = [line.strip() for line in re.split(r"[\r\n]", tail) if ERROR_LINE.search(line.strip())]
    own = [line for line in errors if not SRUN_EXIT.match(line)]
    return (own or errors or [None])[-1]


@dataclasses.dataclass
class ItemStatus:
    item: WorkItem
    state: str  # done, running, pending, failed, not queued (or not done, without Slurm)
    task: int  # its array task
    log: Path | None = None  # the newest log of its array task
    reason: str = ""  # failed: sacct's state and the log's line


def item_states(cfg: Config, items: list[WorkItem], per_task: int, logs: list[tuple[int, int, Path]],
                queued: dict[int, str] | None, ended: dict[tuple[int, int], str] | None) -> list[ItemStatus]:
    """The state of every item from the results folder, its array task's newest log (`logs`: (array
    job, task, path)), the queue (`queued`: {task: state}, None without Slurm) and the accounting
    (`ended`: {(array job, task): failed state}, None without)."""
    newest = {task: (job, path) for job, task, path in logs}  # (sorted by job: the newest wins)
    out = []
    for k, item in enumerate(items):
        task = k // per_task
        job, log = newest.get(task, (None, None))
        reason = ""
        if finished(cfg, item.item_id):
            state = "done"
        elif queued is not None and task in queued:
            state = "running" if queued[task] in ("RUNNING", "COMPLETING") else "pending"
        else:
            line = failure_line(log) if log is not None else None
            ended_as = (ended or {}).get((job, task), "")
            state = "failed" if line or ended_as else "not queued" if queued is not None else "not done"
            reason = ": ".join(filter(None, (ended_as, line or "(no error in the log)")))
        out.append(ItemStatus(item, state, task, log, reason))
    return out


def _models(item: WorkItem) -> int:
    """Models an item scores (its α, or one merge): the unit of the sweep's rate."""
    return max(len(item.alphas), 1)


def eta(finishes: list[tuple[float, int]], left: int) -> tuple[float, float] | None:
    """(seconds to score `left` models, models per hour) at the rate of the finished items ((finish
    time, models) each): the models finished after the first over the time since it; None with fewer
    than two finishes apart."""
    finishes = sorted(finishes)
    if len(finishes) < 2 or finishes[-1][0] <= finishes[0][0]:
        return None
    per_second = sum(m for _, m in finishes[1:]) / (finishes[-1][0] - finishes[0][0])
    return left / per_second, per_second * 3600


def status_lines(cfg: Config, states: list[ItemStatus], *, slurm: bool, accounting: bool) -> list[str]:
    """The counts, each failure with its log's line, and the ETA."""
    count = {s: sum(st.state == s for st in states) for s in ("done", "running", "pending", "failed")}
    rest = len(states) - sum(count.values())
    head = f"sweep {cfg.experiment}: {len(states)} item(s) planned, {count['done']} done, "
    if slurm:
        head += (f"{count['running']} running, {count['pending']} pending, {count['failed']} failed, "
                 f"{rest} not queued")
    else:
        head += (f"{count['failed']} failed, {rest} not done (no Slurm answered: running and pending items "
                 "are among those not done)")
    lines = [head]
    for st in states:
        if st.state == "failed":
            where = st.log.relative_to(cfg.root) if st.log.is_relative_to(cfg.root) else st.log
            lines.append(f"  failed: {st.item.item_id} ({st.item.method}, {Path(st.item.mm).name}), array task "
                         f"{st.task}, {where}: {st.reason}")
    if slurm and not accounting:
        lines.append("  (no Slurm accounting here: failures are read from the logs alone)")
    times = finish_times(cfg.layout.results_dir)
    finishes = [(datetime.strptime(times[st.item.item_id], "%Y-%m-%dT%H:%M:%S%z").timestamp(), _models(st.item))
                for st in states if st.state == "done" and st.item.item_id in times]
    left = sum(_models(st.item) for st in states if st.state != "done")
    rate = eta(finishes, left)
    if left and rate:
        lines.append(f"  ETA: {hours(rate[0])} for the {left} model(s) left, at the finished items' rate of "
                     f"{rate[1]:.1f} models/h")
    elif left:
        lines.append("  ETA: unknown until two items have finished")
    return lines


def status_command(cfg: Config, *, logs: list[tuple[int, int, Path]], queued: dict[int, str] | None,
                   ended: dict[tuple[int, int], str] | None, max_array_size: int) -> None:
    """Print the sweep's status (`vlmerge status`) from its results, its array tasks' logs and what
    Slurm answered (`item_states`)."""
    if cfg.sweep.pairing == "best_text" and kept_best_text(cfg)[1]:  # the plan would score them first
        raise VlmergeError("sweep.pairing best_text: the twins' checkpoints are not all scored yet (vlmerge sweep "
                           "plan, or the pipeline's best-text job, scores them), so the plan is not known")
    items = current_plan(cfg)
    _, per_task = array_layout(len(items), max_array_size)
    states = item_states(cfg, items, per_task, logs, queued, ended)
    print("\n".join(status_lines(cfg, states, slurm=queued is not None, accounting=ended is not None)))
