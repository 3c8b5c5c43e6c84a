"""`vlmerge train --run seed|text|multimodal`: DeepSpeed training on a words-seen schedule."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from tqdm import tqdm

from vlmerge.config import EXPERT_RUN, RUN_NAMES, Config, merge_dicts, save_resolved
from vlmerge.data import Batch, Piece, count_batches, data_digest, epoch_order, plan_batches, run_data, split_note
from vlmerge.errors import Preempted, VlmergeError
from vlmerge.hf import quiet_transformers
from vlmerge.io import append_text, atomic_path, fingerprint, read_json, remove_stale_temps, write_json
from vlmerge.model import PooledLlavaForConditionalGeneration, build_config, experts_from_agnostic, init_model
from vlmerge.problems import ProblemLog
from vlmerge.train import distributed
from vlmerge.layout import checkpoints_dir, list_checkpoints, run_config, run_lock, run_metrics_log, states_dir
from vlmerge.train.checkpoint import Provenance, StateStore, TrainState, write_checkpoint
from vlmerge.train.monitor import Monitor, check_monitors
from vlmerge.train.preemption import StopFlag
from vlmerge.train.schedule import batch_shape, checkpoint_words, lr_factor, rank_micro_batches


def deepspeed_config(cfg: Config, grad_accum: int) -> dict:
    """The DeepSpeed config generated from `train` (with this world size's accumulation), with
    `train.deepspeed` merged over it."""
    t = cfg.train
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return merge_dicts(generated, t.deepspeed)


def _optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)


def _run_fingerprint(cfg: Config, run: str) -> str:
    """What determines a run's weights: a run directory is never continued under other settings."""
    # A fixed global batch is not a setting of the old runs: their fingerprints stay as they were.
    t = cfg.train.model_dump(exclude={"log_every", "check_replicas", "monitor"} | ({"global_batch"} if cfg.train.global_batch is None else set()))
    # The expert fields shape the expert run only, a padded vocabulary the runs that have one: the
    # other runs keep the fingerprints they had.
    model = cfg.model.model_dump(exclude=(set() if run == EXPERT_RUN else {"experts", "cross_modal_layers"})
                                 | ({"vocab_size"} if cfg.model.vocab_size is None else set()))
    # A feature grid shapes the model (G² image tokens); grid 1 runs keep the fingerprints they had.
    features = [cfg.features.name] + ([cfg.features.grid] if cfg.features.grid > 1 else [])
    data = {k: [cfg.layout.relative(p) for p in v] for k, v in cfg.data.model_dump().items()}
    return fingerprint([model, t, cfg.checkpoints.words, getattr(cfg.runs, run).model_dump(),
                        cfg.runs.seed_pretraining, data, *features, cfg.tokenizer.identity()])


def same_settings(cfg: Config, run: str) -> bool:
    """Whether the run folder, if started, was started with these settings (`run.json`)."""
    marker = cfg.layout.run_dir(run) / "run.json"
    return not marker.is_file() or read_json(marker)["fingerprint"] == _run_fingerprint(cfg, run)


def finished(cfg: Config, run: str) -> bool:
    """Whether the run has trained every epoch under these settings: its newest state says so (no lock
    taken: for orchestration that trains a shared run if need be, from several tasks at once)."""
    state = StateStore(cfg.layout.run_dir(run), 1, 0).position()
    return state is not None and state.epoch >= (getattr(cfg.runs, run).epochs or cfg.train.epochs) \
        and same_settings(cfg, run)


def check_request(cfg: Config, run: str) -> None:
    """What can be refused before a run's folder is touched: the run's name, its settings."""
    if run not in RUN_NAMES:
        raise VlmergeError(f"--run {run!r}: expected one of {', '.join(RUN_NAMES)}")
    if run == "seed" and not cfg.runs.seed_pretraining:
        raise VlmergeError("--run seed: seed pre-training is off (set runs.seed_pretraining=true)")
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise VlmergeError("train.precision fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                           "use bf16 or fp32 on the CPU")
    check_monitors(cfg.train.monitor)


class Trainer:
    """One run on one rank: data, engine, state, checkpoints."""

    def __init__(self, cfg: Config, run: str, rank: int, world: int, progress: bool):
        self.cfg, self.run, self.rank, self.world, self.progress = cfg, run, rank, world, progress
        self.spec = getattr(cfg.runs, run)
        self.run_dir = cfg.layout.run_dir(run)
        self.epochs = self.spec.epochs or cfg.train.epochs
        self.thresholds = checkpoint_words(cfg.checkpoints.words)
        self._check_run_dir()

        self.tok_dir = cfg.layout.tokenizer_dir
        problems = ProblemLog()
        data = run_data(cfg, self.spec.sources, problems, multimodal_flags=run == EXPERT_RUN)
        self.samples, self.collate = data.samples, data.collate
        if self.rank == 0:
            problems.report(f"train {run}")
            if note := split_note(self.samples, cfg.model.max_length):
                print(f"train {run}: warning: {note}", file=sys.stderr)
        t = cfg.train
        self.global_batch, self.accum = batch_shape(t.micro_batch_size, t.grad_accum, t.global_batch, world)
        model = self._initial_model(build_config(cfg.model, data.tokenizer, data.features.dim, cfg.features.layer,
                                                 image_tokens=data.features.tokens, experts=run == EXPERT_RUN))
        self.total_steps = self._count_steps()
        self.engine = self._engine(model)
        self.states = StateStore(self.run_dir, cfg.checkpoints.keep_states, rank, world, self.global_batch)
        self.provenance = self._provenance()
        self.replica_digests: list[str] = []

    def _check_run_dir(self) -> None:
        if not same_settings(self.cfg, self.run):
            raise VlmergeError(
                f"{self.run_dir}: this run was started with other settings; set another experiment name or remove it"
            )

    def _start(self) -> Path | None:
        """The seed run's last checkpoint, where this run starts from it (seed pre-training); else None."""
        if self.run == "seed" or not self.cfg.runs.seed_pretraining:
            return None
        seeds = list_checkpoints(self.cfg.layout.run_dir("seed"))
        if not seeds:
            raise VlmergeError(f"{self.cfg.layout.run_dir('seed')}: no checkpoint; train the seed run first")
        return seeds[-1]

    def _initial_model(self, config) -> torch.nn.Module:
        """Fresh weights from model.init_seed, or the seed run's last checkpoint (seed pre-training),
        copied into every expert for the expert run."""
        start = self._start()
        if start is None:
            return init_model(config, self.cfg.model.init_seed)
        with quiet_transformers():
            seed = PooledLlavaForConditionalGeneration.from_pretrained(start, use_safetensors=True)
        if self.run == EXPERT_RUN:
            return experts_from_agnostic(seed, self.cfg.model.experts, self.cfg.model.cross_modal_layers)
        return seed

    def _provenance(self) -> Provenance:
        """What this run's checkpoint cards say it was trained on and from."""
        cfg, sources = self.cfg, tuple(self.spec.sources)
        f = cfg.features
        features = (f"`{cfg.store_path}` ({f.encoder}, layer {f.layer}, {f.pooling}"
                    + (f", a {f.grid}×{f.grid} grid" if f.grid > 1 else "") + ")") if "captions" in sources else None
        start = self._start()
        return Provenance(cfg.experiment, sources, {"text": cfg.data.text, "captions": cfg.data.captions}, features,
                          None if start is None else str(start.resolve()), cfg.model.init_seed)

    def _count_steps(self) -> int:
        words = int(self.samples.words.sum())
        return sum(
            count_batches(epoch_order(len(self.samples), self.cfg.train.seed, e), self.samples.words,
                          self.global_batch, self.thresholds, e * words)
            for e in range(self.epochs)
        )

    def _engine(self, model: torch.nn.Module):
        t = self.cfg.train
        optimizer = _optimizer(model, self.cfg)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.min_lr_ratio)
        )
        try:
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                              config=deepspeed_config(self.cfg, self.accum))
        except Exception as e:  # DeepSpeed reports bad config values with many exception types
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise VlmergeError(f"train.deepspeed: DeepSpeed rejected the config: {first.strip()}") from None
        return engine

    # -- the loop -----------------------------------------------------------------------

    def fit(self) -> Path:
        self.engine.train()
        if self.rank == 0:  # what an earlier process of this run left when it was killed mid-write
            remove_stale_temps(self.run_dir, checkpoints_dir(self.run_dir), states_dir(self.run_dir))
        state = self.states.load(self.engine)
        if state is None:
            state = TrainState()
            self._start_run_dir()
            self._checkpoint(state)  # step 0: the shared initialisation, for task arithmetic
        logged = self._metrics_truncate(state.step)
        self.monitor = Monitor(self.cfg.train.monitor if self.rank == 0 else [], self.run_dir, logged,
                               project=self.cfg.experiment, name=self.run, config=self.cfg.model_dump(mode="json"))
        bar = tqdm(total=self.total_steps, initial=state.step, unit="step", desc=f"train {self.run}",
                   disable=not (self.progress and self.rank == 0), file=sys.stderr, dynamic_ncols=True)
        t0, words0, tokens0 = time.perf_counter(), state.words_seen, state.tokens_seen
        with self.monitor, bar, StopFlag() as stop:
            while state.epoch < self.epochs:
                order = epoch_order(len(self.samples), self.cfg.train.seed, state.epoch)
                for batch in plan_batches(order, self.samples.words, self.global_batch, self.thresholds,
                                          state.words_seen, state.cursor, state.offset):
                    tokens = self.collate.tokens_in(batch.pieces)
                    loss = self._step(batch, tokens)
                    state.step += 1
                    state.cursor, state.offset, state.words_seen = batch.cursor, batch.offset, batch.words_seen
                    state.tokens_seen += tokens
                    state.data = data_digest(state.data, batch)
                    bar.update()
                    scheduled = state.words_seen in self.thresholds
                    if scheduled or state.step % self.cfg.train.log_every == 0:
                        state.loss = self._mean(loss)
                        rate = (time.perf_counter() - t0) or 1e-9
                        self._metrics(state, (state.words_seen - words0) / rate, (state.tokens_seen - tokens0) / rate)
                        bar.set_postfix(loss=f"{state.loss:.3f}", words=state.words_seen)
                    if scheduled:
                        self._checkpoint(state)
                        self.states.save(self.engine, state)
                    elif state.step % self.cfg.checkpoints.state_every_steps == 0:
                        self.states.save(self.engine, state)
                    if self._any(bool(stop)):
                        self.states.save(self.engine, state)
                        raise Preempted(f"run {self.run}: stopped by a signal at step {state.step}; state saved")
                state.epoch, state.cursor, state.offset = state.epoch + 1, 0, 0
                if self.cfg.checkpoints.every_epoch:
                    self._checkpoint(state)
                self.states.save(self.engine, state)
        return self.run_dir

    def _step(self, batch: Batch, tokens: int) -> torch.Tensor:
        """One optimizer step over the global batch (`tokens` target tokens): this rank's micro-batches.

        Each micro-batch's mean loss is weighted by its share of the batch's tokens, times the number
        of micro-batches (DeepSpeed divides by the accumulation steps, the all-reduce by the ranks): the
        gradient is that of the mean over every token of the batch, however the ranks share it.
        """
        micro = self.cfg.train.micro_batch_size
        slots = self.accum * self.world
        total = torch.zeros(())
        for chunk in rank_micro_batches(batch.pieces, micro, self.rank, self.world, self.accum):
            # A rank with nothing to do still runs a step, on a zero-weighted stand-in, so that
            # every rank joins the same gradient all-reduce.
            inputs = self.collate(chunk or [Piece(0, 0, int(self.samples.words[0]))])
            weight = int((inputs["labels"][:, 1:] != -100).sum()) * slots / tokens if chunk else 0.0
            inputs = {key: v.to(self.engine.device) for key, v in inputs.items()}
            loss = self.engine(**inputs).loss * weight
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float().cpu() / self.accum
        if self.cfg.train.check_replicas:
            self.replica_digests = self._check_replicas()
        return total

    def _check_replicas(self) -> list[str]:
        """Every rank's weight digest; raises when they differ."""
        digest = hashlib.blake2b(digest_size=8)
        for p in self.engine.module.parameters():
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = [None] * self.world
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights after step: {digests}")
        return digests

    def _any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (all ranks stop at the same step)."""
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _mean(self, loss: torch.Tensor) -> float:
        t = loss.clone()
        dist.all_reduce(t)
        return t.item() / self.world

    # -- files ----------------------------------------------------------------------------

    def _start_run_dir(self) -> None:
        if self.rank == 0:
            write_json(self.run_dir / "run.json", {"run": self.run, "fingerprint": _run_fingerprint(self.cfg, self.run)})
            save_resolved(self.cfg, run_config(self.run_dir))
        dist.barrier()

    def _checkpoint(self, state: TrainState) -> None:
        if self.rank == 0:
            write_checkpoint(self.engine.module, self.tok_dir, self.run_dir, state, self.run, self.provenance)
        dist.barrier()

    def _metrics_path(self) -> Path:
        return run_metrics_log(self.run_dir)

    def _metrics(self, state: TrainState, words_per_s: float, tokens_per_s: float) -> None:
        if self.rank != 0:
            return
        row = {"step": state.step, "epoch": state.epoch, "words": state.words_seen, "tokens": state.tokens_seen,
               "data": state.data, "loss": state.loss, "lr": self.engine.get_lr()[0], "words_per_s": round(words_per_s, 1),
               "tokens_per_s": round(tokens_per_s, 1), "time": time.time()}
        if self.cfg.train.check_replicas:
            row["replica_digests"] = self.replica_digests
        append_text(self._metrics_path(), json.dumps(row) + "\n")
        self.monitor.log(row)  # after the record: a view never holds a row metrics.jsonl lacks

    def _metrics_truncate(self, step: int) -> list[dict]:
        """On resume, forget metrics logged after the state we resume from (they will be logged again);
        the rows kept (none on ranks other than 0)."""
        path = self._metrics_path()
        if self.rank != 0 or not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        keep, rows = [], []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:  # torn by a kill mid-append: it is logged again
                    continue
                raise VlmergeError(f"{path}:{i + 1}: expected one JSON object per line") from None
            if row.get("step", 0) <= step:
                keep.append(line)
                rows.append(row)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
        return rows


def train(cfg: Config, run: str, *, progress: bool = True, job: tuple[str, int] = ("", 0)) -> Path:
    """Train one run to the end (or until a signal), resuming from its newest state if any; `job`: the
    Slurm job and start it runs as, whose earlier starts' lock it takes over."""
    check_request(cfg, run)
    rank, world = distributed.setup()
    # One training of a run at a time: a second one (a requeue beside a job still running) would
    # log and save over the first. A killed job's lock is taken over (`vlmerge.locks`).
    with distributed.held_by_rank0(run_lock(cfg.layout.run_dir(run)), f"train --run {run}", job):
        out = Trainer(cfg, run, rank, world, progress).fit()
    if rank == 0:
        ckpts = list_checkpoints(out)
        print(f"train {run}: {out}: {len(ckpts)} checkpoints, last {ckpts[-1].name}")
    return out
