"""`vlmerge pipeline`: every stage in order, in this process; each skips what is already complete."""

from __future__ import annotations

from pathlib import Path

from vlmerge.config import Config
from vlmerge.sweep.commands import current_plan
from vlmerge.sweep.plan import sweep_runs
from vlmerge.sweep.run import run_items


def reads_demo_world(cfg: Config) -> bool:
    """Whether the config's data lives in the demo world (then the pipeline generates it first)."""
    paths = [*cfg.data.text, *cfg.data.captions, *(i.manifest for i in cfg.features.images)]
    return any(Path(p).is_relative_to(cfg.demo.out) for p in paths)


def run_data_stages(cfg: Config, *, progress: bool = False) -> None:
    """The demo world (when the config reads it), tokenizer, token shards and features."""
    from vlmerge.precompute import corpus, tokenizer
    from vlmerge.precompute.features import precompute
    from vlmerge.demo import generate

    if reads_demo_world(cfg):
        d = cfg.demo
        generate(Path(d.out), d.seed, text_words=d.text_words, n_images=d.n_images, n_winoground=d.n_winoground,
                 pairs_per_phenomenon=d.pairs_per_phenomenon, progress=progress)
    tokenizer.run(cfg, progress=progress)
    corpus.run(cfg)
    precompute(cfg, progress=progress)


def run_pipeline_until_sweep(cfg: Config, *, progress: bool = False) -> None:
    """Data, features and training: everything the sweep needs."""
    from vlmerge.train.loop import train

    run_data_stages(cfg, progress=progress)
    runs = (["seed"] if cfg.runs.seed_pretraining else []) + sweep_runs(cfg)
    for run in runs:
        train(cfg, run, progress=progress)


def run_pipeline(cfg: Config, *, progress: bool = False) -> Path:
    """Every stage, the sweep, then the analysis; returns the report's path."""
    from vlmerge.analysis import analyze

    run_pipeline_until_sweep(cfg, progress=progress)
    items = current_plan(cfg)
    run_items(cfg, items, progress=progress)
    print(f"pipeline: {len(items)} work items; results in {cfg.layout.results_dir}")
    if cfg.sweep.finetune:
        from vlmerge.sweep.commands import finetune_command

        finetune_command(cfg, index=None, count_only=False, progress=progress)
    report = analyze([cfg.layout.results_dir], cfg.layout.report_dir, cfg.analysis)
    print(f"pipeline: report {report}")
    return report
