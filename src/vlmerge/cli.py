"""`vlmerge <stage> --config FILE [key.path=value ...]`: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from vlmerge import launch
from vlmerge.config import RUN_NAMES, Config, alpha_problem, load_config, parse_value
from vlmerge.errors import PREEMPTED_EXIT, Preempted, VlmergeError
from vlmerge.study import PARTS as study_parts

Handler = Callable[[Config, argparse.Namespace], object]


def _demo_data(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.demo import generate
    from vlmerge.pipeline import reads_demo_world

    if args.if_needed and not reads_demo_world(cfg):
        print("demo-data: the config does not read the demo world; nothing to do")
        return
    d = cfg.demo
    out = Path(args.out) if args.out else Path(d.out)
    world = generate(
        out, args.seed if args.seed is not None else d.seed, text_words=d.text_words, n_images=d.n_images,
        n_winoground=d.n_winoground, pairs_per_phenomenon=d.pairs_per_phenomenon, progress=_progress(args),
    )
    print(f"demo-data: {world.root}")


def _tokenizer(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.precompute import tokenizer

    tokenizer.run(cfg, progress=_progress(args))


def _corpus(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.precompute import corpus

    corpus.run(cfg)


def _precompute(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.precompute.features import precompute

    if args.num_shards is not None and args.num_shards < 1:
        raise VlmergeError(f"--num-shards {args.num_shards}: expected a whole number of shards, at least 1")
    num_shards = args.num_shards or cfg.features.num_shards
    precompute(
        cfg, shard=args.shard if args.shard is not None else launch.array_shard(num_shards), num_shards=args.num_shards, link_only=args.link,
        retry_failures=args.retry_failures, progress=_progress(args),
    )


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.train.loop import train

    launch.export_rendezvous()  # ranks from torchrun or srun
    train(cfg, args.run, progress=_progress(args), job=launch.slurm_job())


def _export_text(args: argparse.Namespace) -> None:
    from vlmerge.model import export_text

    print(f"export-text: {export_text(Path(args.checkpoint), Path(args.out))}")


def _statistics(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.layout import statistics_file
    from vlmerge.merge.statistics import write_statistics

    for checkpoint in args.checkpoint:
        write_statistics(cfg, Path(checkpoint), args.statistic)
        for name in args.statistic:
            print(f"{name}: {statistics_file(Path(checkpoint), name)}")


def _eval(cfg: Config, args: argparse.Namespace) -> None:
    if args.harness is not None:
        # both would write the same results.parquet; lm-eval's tasks have no BabyLM 2025 export nor images
        if args.task or args.export or args.shuffle_features is not None:
            raise VlmergeError("--harness runs lm-eval's tasks alone: leave out --task, --export and "
                               "--shuffle-features (run those with another --out)")
        tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
        if not tasks:
            raise VlmergeError("--harness: no task named; give TASK[,TASK…]")
        from vlmerge.evaluate.run import harness_command

        harness_command(cfg, Path(args.model), tasks, out=Path(args.out),
                        include_path=[Path(d) for d in args.harness_include], dtype=args.dtype,
                        features=args.features, job_id=launch.job_id())
        return
    if args.harness_include:
        raise VlmergeError("--harness-include goes with --harness")
    from vlmerge.evaluate.run import eval_command

    if args.export and args.export[0] != "babylm":
        raise VlmergeError(f"--export {args.export[0]}: the only format is babylm")
    export = Path(args.export[1]) if args.export else None
    eval_command(cfg, Path(args.model), args.task, dtype=args.dtype, features=args.features, out=Path(args.out),
                 job_id=launch.job_id(), export=export, shuffle_features=args.shuffle_features)


def _finetune(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.finetune.run import finetune_command

    finetune_command(cfg, Path(args.model), args.task, out=Path(args.out), progress=_progress(args),
                     job_id=launch.job_id())


def _export_babylm(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.evaluate.babylm_submission import check_command, export_command

    if args.check:
        if args.run or args.out or args.text_only:
            raise VlmergeError("--check reads a pipeline results folder: give it without --run, --out, --text-only")
        if not args.track:
            raise VlmergeError("--check needs --track (strict-small, strict, multimodal or interaction): it "
                               "decides the revisions and the files collate_preds.py reads")
        check_command(Path(args.check), args.track)
    elif args.run and args.out:
        export_command(cfg.layout.run_dir(args.run), Path(args.out), text_only=args.text_only)
    else:
        raise VlmergeError("give --run RUN --out DIR (export), or --check RESULTS/<model> --track TRACK")


def _aoa(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.evaluate.run import aoa_command, aoa_sweep_command
    from vlmerge.layout import list_checkpoints

    if args.sweep:
        aoa_sweep_command(cfg, Path(args.cdi), out=Path(args.out))
        return
    if args.words is None:
        raise VlmergeError("aoa: --words is required (BabyLM's cdi_childes.json), unless --sweep")
    checkpoints = [Path(c) for c in args.checkpoint] or list_checkpoints(cfg.layout.run_dir(args.run))
    aoa_command(cfg, checkpoints, Path(args.words), Path(args.cdi), dtype=args.dtype, out=Path(args.out))


def _sweep(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.sweep import commands
    from vlmerge.sweep.plan import array_layout

    if args.action == "plan" and args.runs:  # for pipeline.sh: what to train before the sweep
        from vlmerge.sweep.plan import sweep_runs

        print(*sweep_runs(cfg))
    elif args.action == "plan" and args.gpus:  # for pipeline.sh: the GPUs of each sweep job
        print(launch.sweep_gpus_per_task(cfg.compute.device))
    elif args.action == "plan" and args.estimate:
        from vlmerge.sweep.estimate import counts_arg, estimate_command

        estimate_command(cfg, words_per_epoch=counts_arg(args.words_per_epoch, "--words-per-epoch"),
                         counts=counts_arg(args.items, "--items"),
                         calibrate_with=Path(args.calibrate_with) if args.calibrate_with else None, sample=args.sample,
                         max_array_size=launch.max_array_size(), time_limit=launch.partition_time_limit(args.partition),
                         as_json=args.json)
    elif args.action == "finetune":
        index = args.index if args.index is not None else launch.array_task_index()
        commands.finetune_command(cfg, index=index, count_only=args.array, progress=_progress(args),
                                  job_id=launch.job_id())
    elif args.action == "plan":
        items = commands.current_plan(cfg)
        max_size = launch.max_array_size()
        layout = array_layout(len(items), max_size)
        if args.array:  # for jobs/sweep.sbatch and pipeline.sh: "TASKS PER_TASK GPUS_PER_TASK"
            print(*layout, launch.sweep_gpus_per_task(cfg.compute.device))
        else:
            commands.plan_command(cfg, items, as_json=args.json, array_tasks=layout, max_array_size=max_size)
    else:
        index = args.index if args.index is not None else launch.array_task_index()
        if args.worker is None:
            from vlmerge.device import cuda_count

            envs = launch.worker_envs(cfg.compute.workers, cfg.compute.device, cuda_count())
            if len(envs) > 1:  # one process per GPU (or compute.workers), each running its share
                print(f"sweep: {len(envs)} workers", file=sys.stderr)
                launch.run_workers(_sweep_worker_command(args, index), envs)
                return
        commands.run_command(cfg, item_id=args.item, index=index, per_task=args.per_task, progress=_progress(args),
                             job_id=launch.job_id(), worker=args.worker)


def _status(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.layout import array_task_logs
    from vlmerge.sweep.status import status_command

    logs = array_task_logs(cfg.layout.logs_dir, launch.SWEEP_JOB_NAME)
    status_command(cfg, logs=logs, queued=launch.queued_array_tasks(launch.SWEEP_JOB_NAME, cfg.layout.logs_dir),
                   ended=launch.failed_array_tasks(sorted({job for job, _, _ in logs})),
                   max_array_size=launch.max_array_size())


def _sweep_worker_command(args: argparse.Namespace, index: int | None) -> list[str]:
    """The `vlmerge sweep run` of this process again, for its workers (each adds `--worker k/n`)."""
    words = [sys.executable, "-m", "vlmerge", "sweep", "run", "--per-task", str(args.per_task)]
    for flag, value in (("--config", args.config), ("--item", args.item), ("--index", index)):
        words += [flag, str(value)] if value is not None else []
    return words + (["--quiet"] if args.quiet else []) + args.overrides


def _config(cfg: Config, args: argparse.Namespace) -> None:
    if args.get is None:
        print(cfg.to_yaml(), end="")
        return
    node = cfg.model_dump(mode="json")
    for part in args.get.split("."):
        if not isinstance(node, dict) or part not in node:
            raise VlmergeError(f"--get {args.get}: no such key")
        node = node[part]
    print(node)


def _pipeline(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.pipeline import run_pipeline

    run_pipeline(cfg, progress=_progress(args))


def _study(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge import study

    if args.array:  # for jobs/study.sh: the size of each array, in the order of study.ARRAYS
        print(*study.array_sizes(cfg).values())
    elif args.part is None:
        study.run_study(cfg, progress=_progress(args))
    else:
        index = args.index if args.index is not None else launch.array_task_index()
        study.run_part(cfg, args.part, index, progress=_progress(args))


def _results(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.results import compact
    from vlmerge.sweep.commands import current_plan
    from vlmerge.sweep.run import result_ids

    items = current_plan(cfg)
    planned = result_ids(items)
    if cfg.sweep.finetune:  # the fine-tuning items of the sweep are its too
        from vlmerge.sweep.finetune import finetune_plan

        planned |= {it.item_id for it in finetune_plan(cfg, items)}
    for name in ("metrics", "items"):
        files, rows, foreign = compact(cfg.layout.results_dir, name, planned)
        left = f"; left alone (not this sweep's): {', '.join(f.name for f in foreign)}" if foreign else ""
        print(f"results compact: {name}: {files} file(s) -> 1, {rows} rows{left}")


def _analyze(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.analysis import cli

    cli.run(cfg, args)


def _merge(args: argparse.Namespace) -> None:
    from vlmerge.merge.core import merge_to_disk

    params = _params(args.param)
    if args.recipe:
        from vlmerge.merge.recipe import read_recipe

        given = [f"--{k}" for k in ("text", "mm", "base", "method", "alpha") if getattr(args, k) is not None]
        if given:
            raise VlmergeError(f"--recipe gives the models, the method and α: leave out {', '.join(given)}")
        recipe = read_recipe(Path(args.recipe))
        if set_twice := sorted(params.keys() & recipe.params.keys()):
            raise VlmergeError(f"--param {set_twice[0]}: the recipe sets it ({args.recipe}); --param may add only "
                               "what mergekit's recipe cannot say (seed, schedule)")
        text, mm, base, method, alphas = recipe.text, recipe.mm, recipe.base, recipe.method, [recipe.alpha]
        params = recipe.params | params
    elif args.text is None or args.mm is None:
        raise VlmergeError("give --text and --mm (the two models), or --recipe FILE (mergekit's YAML)")
    else:
        text, mm, base, method = args.text, args.mm, args.base, args.method or "linear"
        alphas = [None] if args.alpha is None else _alphas(args.alpha, args.allow_extrapolation)
    outs = merge_to_disk(text, mm, args.out, method, alphas, params=params, base=base,
                         allow_extrapolation=args.allow_extrapolation, progress=_progress(args))
    print(f"merge {method}: {len(outs)} model(s) in {args.out}")


def _probe(cfg: Config, args: argparse.Namespace) -> None:
    from vlmerge.device import resolve_device
    from vlmerge.evaluate.probe import SIGNALS, ProbeSet, signals
    from vlmerge.evaluate.run import load_model
    from vlmerge.io import write_json
    from vlmerge.merge.core import PairMerger
    from vlmerge.merge.distance import distances
    from vlmerge.sweep.run import open_pair

    alphas = _alphas(args.alpha, False)
    device = resolve_device(cfg.compute.device)
    probe = ProbeSet.load(cfg)
    text, mm = Path(args.text), Path(args.mm)
    pair = open_pair(cfg, args.method, text, mm, Path(args.base) if args.base else None)
    merger = PairMerger(pair, device=device)
    model, _ = load_model(text, device)
    params = _params(args.param)
    rows = []
    print(f"{'α':>5} " + " ".join(f"{s:>22}" for s in SIGNALS))
    for alpha in alphas:
        merger.merge_into(model, args.method, alpha, params)
        values = signals(model, probe, f"the {args.method} merge at α {alpha:g} of {text} and {mm}")
        rows.append({"alpha": alpha, **values})
        print(f"{alpha:>5g} " + " ".join(f"{values[s]:>22.4f}" for s in SIGNALS))
    between = distances(pair.text, pair.mm, pair.base, per_layer=False, device=device)
    for scope, per in between.items():
        print(f"distances ({scope}): " + ", ".join(f"{metric} {v:.4g}" for metric, v in per.items()))
    if args.out:
        write_json(Path(args.out), {"method": args.method, "params": params, "signals": rows, "distances": between})
        print(f"probe: -> {args.out}")


def _merge_experts(args: argparse.Namespace) -> None:
    from vlmerge.layout import merge_outputs
    from vlmerge.merge.experts import expert_method, merge_experts
    from vlmerge.modelkey import EXPERT_METHOD_PREFIX

    params = _params(args.param)
    if "alpha" in params:
        raise VlmergeError("merge-experts: give alpha with --alpha, not --param")
    method = EXPERT_METHOD_PREFIX + args.method.removeprefix(EXPERT_METHOD_PREFIX)  # `interpolation` or its full name
    if not expert_method(method).takes_alpha:
        if args.alpha is not None:
            raise VlmergeError(f"merge-experts {args.method}: takes no --alpha")
        settings, outs = [(None, params)], [Path(args.out)]
    else:
        alphas = _alphas(args.alpha or "0.5", allow_extrapolation=False)
        settings, outs = [(a, params) for a in alphas], merge_outputs(Path(args.out), alphas)
    merge_experts(args.checkpoint, outs, method, settings, seed=args.seed)
    print(f"merge-experts {args.method}: {len(outs)} model(s) in {args.out}")


def _distance(args: argparse.Namespace) -> None:
    from vlmerge.device import resolve_device
    from vlmerge.merge.distance import distance_rows, write_parquet
    from vlmerge.merge.io import ModelDir

    device = resolve_device(args.device)
    if args.experts:
        if args.a or args.b:
            raise VlmergeError("distance: give either --experts or --a and --b")
        from vlmerge.merge.experts import expert_distance_rows
        from vlmerge.modelkey import expert_distance_run

        rows = expert_distance_rows(args.experts, args.base, per_layer=not args.model_only, device=device)
        write_parquet(rows, Path(args.out))
        vl = rows[(rows.scope == "transformer") & (rows.mm_run == expert_distance_run("vision"))]
        print(vl.pivot(index="metric", columns="space", values="value").to_string(float_format=lambda v: f"{v:.6g}"))
        print(f"distance: {len(rows)} rows -> {args.out}")
        return
    if not (args.a and args.b):
        raise VlmergeError("distance: give --a and --b (two models), or --experts (an expert checkpoint)")
    base = ModelDir(args.base) if args.base else None
    rows = distance_rows(ModelDir(args.a), ModelDir(args.b), base, per_layer=not args.model_only, device=device)
    write_parquet(rows, Path(args.out))
    model = rows[rows.scope == "model"].pivot(index="metric", columns="space", values="value")
    print(model.to_string(float_format=lambda v: f"{v:.6g}"))
    print(f"distance: {len(rows)} rows -> {args.out}")


def _alphas(text: str, allow_extrapolation: bool) -> list[float]:
    """`--alpha 0,0.5,1`, checked by the rule of `sweep.alphas` (non-empty, finite, unique, in [0, 1])."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise VlmergeError(f"--alpha {text!r}: expected numbers separated by commas, e.g. 0,0.5,1") from None
    problem = alpha_problem(alphas, allow_extrapolation)
    if problem:
        raise VlmergeError(f"--alpha {text!r}: {problem.replace('allow extrapolation', 'pass --allow-extrapolation')}")
    return alphas


def _worker(text: str) -> tuple[int, int]:
    """`--worker K/N`: worker K (from 0) of N."""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(k), int(n)


def _device(text: str) -> str:
    """A --device value, by the rule of compute.device."""
    from vlmerge.device import check_device_spec

    try:
        return check_device_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _params(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VlmergeError(f"--param {item!r}: expected NAME=VALUE, e.g. density=0.2")
        out[key] = parse_value(value, f"--param {item!r}")
    return out


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty() or bool(os.environ.get("VLMERGE_PROGRESS"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmerge", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, handler: Handler, help: str, actions: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if actions:
            p.add_argument("action", choices=actions)
        p.add_argument("--config", help="experiment YAML (default: the embedded demo config)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
        p.set_defaults(handler=handler)
        return p

    p = stage("demo-data", _demo_data, "generate the built-in demo world (text, images, captions, test sets, encoder)")
    p.add_argument("--out", help="folder to write (default: demo.out of the config)")
    p.add_argument("--seed", type=int, help="world seed (default: demo.seed of the config)")
    p.add_argument("--if-needed", action="store_true", help="only when the config's data is in the demo world")

    stage("tokenizer", _tokenizer, "train the BPE tokenizer on the text sources; report subword tokens per word")
    stage("corpus", _corpus, "tokenise text files and caption manifests into memory-mappable token shards")

    p = stage("precompute", _precompute, "DINOv2 features of every image into one HDF5 store (sharded, resumable)")
    p.add_argument("--shard", type=int, help="run only this shard (default: SLURM_ARRAY_TASK_ID, else all)")
    p.add_argument("--num-shards", type=int, help="number of shards (default: features.num_shards)")
    p.add_argument("--link", action="store_true", help="only join finished shards into the store")
    p.add_argument("--retry-failures", action="store_true", help="try failed images of finished shards again")

    p = stage("train", _train, "DeepSpeed training of one run, checkpoints by words seen; resumes by itself")
    p.add_argument("--run", required=True, choices=RUN_NAMES, help="which run of the experiment")

    p = stage("statistics", _statistics, "data statistics of run checkpoints for merging (RegMean's Grams, Fisher), "
              "each on its own run's data")
    p.add_argument("--statistic", action="append", required=True,
                   help="which statistic: grams or fisher (repeatable)")
    p.add_argument("--checkpoint", required=True, action="append", help="a run checkpoint (repeatable)")

    p = stage("eval", _eval, "score a model on BLiMP, EWoK, Winoground, VQA, perplexity …; Parquet results")
    p.add_argument("--model", required=True, help="a checkpoint, a merge, or any causal-LM directory")
    p.add_argument("--task", action="append", default=[], metavar="NAME[=PATH]",
                   help="a task, with its data path unless eval.tasks has it (repeatable; default: eval.tasks)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: eval.dtype")
    p.add_argument("--features", help="feature store of the evaluation images (default: eval.features)")
    p.add_argument("--shuffle-features", type=int, metavar="SEED",
                   help="a control: every image gets another image's feature (seeded); the model's use of "
                        "the images is lost, the text is not")
    p.add_argument("--out", required=True,
                   help="folder for results.parquet and items.parquet (not one of another model's results)")
    p.add_argument("--harness", metavar="TASK[,TASK]",
                   help="lm-evaluation-harness tasks instead of --task (log-likelihood ones, scored by our Scorer; "
                        "offline); lm-eval's results to OUT/harness/results.json")
    p.add_argument("--harness-include", action="append", default=[], metavar="DIR",
                   help="a folder of custom lm-eval task YAMLs (repeatable)")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"),
                   help="also write the predictions for submission: `babylm DIR` writes BabyLM 2025's "
                        "DIR/zero_shot/causal/<task>/<dataset>/predictions.json (DIR = its results/<model>/<revision>)")

    p = stage("finetune", _finetune, "BabyLM's (Super)GLUE fine-tuning of a model (its recipe and head), task by task")
    p.add_argument("--model", required=True, help="a checkpoint, a merge, or any causal-LM directory")
    p.add_argument("--task", action="append", default=[], metavar="NAME[=FOLDER]",
                   help="a task (boolq, cola, mnli, mrpc, multirc, qnli, qqp, rte, sst2, wsc) and the folder of its "
                        "<task>.train.jsonl and <task>.valid.jsonl unless finetune.tasks has it (repeatable; "
                        "default: finetune.tasks)")
    p.add_argument("--out", required=True,
                   help="folder of BabyLM's finetune/<task>/{results.txt,predictions.json} (DIR = its "
                        "results/<model>/<revision>) and our results.parquet, items.parquet beside them")

    from vlmerge.evaluate.babylm_submission import TRACKS as babylm_tracks

    p = stage("export-babylm", _export_babylm,
              "a run's checkpoints as BabyLM 2025's leaderboard revisions (chck_1M … chck_1000M, main = the last), "
              "or --check a pipeline results folder before collate_preds.py")
    p.add_argument("--run", choices=RUN_NAMES, help="the run whose checkpoints to export")
    p.add_argument("--out", help="folder of the revisions: <out>/chck_<n>M/, <out>/main/ (Hugging Face folders)")
    p.add_argument("--text-only", action="store_true",
                   help="each revision as export-text's LlamaForCausalLM (the pipeline's text tasks load it)")
    p.add_argument("--check", metavar="RESULTS/MODEL",
                   help="instead: list the files collate_preds.py --fast reads under the pipeline's results/<model> "
                        "and their item counts; exit non-zero if any is missing or wrong")
    p.add_argument("--track", choices=babylm_tracks, help="--check: the submission track (its revisions and files)")

    p = stage("aoa", _aoa, "age of acquisition over a run's checkpoints, or over each merge setting's: Pearson r with "
                                     "children's AoA (BabyLM)")
    p.add_argument("--run", choices=RUN_NAMES, default="text", help="the run whose checkpoints form the series")
    p.add_argument("--checkpoint", action="append", default=[], help="the series instead (repeatable)")
    p.add_argument("--sweep", action="store_true",
                   help="every twin and merge setting over the checkpoints, from the sweep's aoa item scores")
    p.add_argument("--words", help="BabyLM's cdi_childes.json (words and their contexts)")
    p.add_argument("--cdi", required=True, help="a CDI-format CSV: word, and proportions at ages 16 … 30")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: eval.dtype")
    p.add_argument("--out", required=True, help="JSON file for the result")

    p = stage("sweep", _sweep, "plan the sweep, or run its work items (all, one, or an array task's); then "
                               "fine-tune the merges of sweep.finetune and their twins (one item per model and task)",
              actions=("plan", "run", "finetune"))
    p.add_argument("--json", action="store_true", help="plan: the items as JSON")
    p.add_argument("--array", action="store_true",
                   help="plan: print 'TASKS ITEMS_PER_TASK GPUS_PER_TASK' for a Slurm array; finetune: print the "
                        "number of fine-tuning items (one array task each)")
    p.add_argument("--runs", action="store_true", help="plan: print the runs whose checkpoints the sweep merges")
    p.add_argument("--gpus", action="store_true", help="plan: print the GPUs each sweep job asks for (compute.device)")
    p.add_argument("--estimate", action="store_true",
                   help="plan: calibrate on this machine and compute.device (one pair loaded, one α merged, a sample "
                        "of each task scored) and print the sweep's cost: hours per array task and in all, memory, disk")
    p.add_argument("--words-per-epoch", action="append", default=[], metavar="RUN=N",
                   help="--estimate before training: a run's words per epoch (default: its corpus's)")
    p.add_argument("--items", action="append", default=[], metavar="TASK=N",
                   help="--estimate: count N items for TASK (e.g. a full set), calibrating on its data's sample")
    p.add_argument("--calibrate-with", metavar="DIR", help="--estimate: a model directory of the runs' architecture "
                                                            "(default: the plan's first checkpoint, else an untrained one)")
    p.add_argument("--sample", type=int, help="--estimate: items scored per task (default: 200 on the CPU, 2000 on a GPU)")
    p.add_argument("--partition", help="--estimate: the Slurm partition whose time limit to check (default: the "
                                       "cluster's default partition)")
    p.add_argument("--item", help="run: this item id only")
    p.add_argument("--index", type=int, help="run, finetune: array task index (default: SLURM_ARRAY_TASK_ID, "
                                             "else all items)")
    p.add_argument("--per-task", type=int, default=1, help="run: items per array task (packed arrays)")
    p.add_argument("--worker", type=_worker, metavar="K/N",
                   help="run: be worker K of N, running its share of the items (set by the parent process: "
                        "compute.workers, one per visible GPU by default)")

    stage("status", _status, "how far the sweep is: items planned, done, running, pending and failed (with "
                             "each failure's log line), from the results folder and Slurm; and when it will end")

    p = stage("config", _config, "print the resolved config, or one value of it (for scripts)")
    p.add_argument("--get", metavar="KEY.PATH", help="print this value only, e.g. features.num_shards")

    stage("pipeline", _pipeline, "every stage in order on this machine (the demo world first if the config uses it)")
    p = stage("study", _study, "Sung et al.'s study: seed lengths, expert variants, merges, MSA/MAA, report")
    p.add_argument("--part", choices=study_parts,
                   help="one part (jobs/study.sh): data, the training, settings, items or finetune array, or the "
                        "report")
    p.add_argument("--index", type=int, help="an array part: this array task only "
                                             "(default: SLURM_ARRAY_TASK_ID, else every task)")
    p.add_argument("--array", action="store_true",
                   help="print the sizes of the Slurm arrays: 'TRAIN SETTINGS ITEMS FINETUNE' tasks")
    stage("results", _results, "consolidate the sweep's result files, without duplicates", actions=("compact",))

    from vlmerge.analysis import cli as analysis_cli

    analysis_cli.add_arguments(stage("analyze", _analyze, analysis_cli.HELP))

    p = sub.add_parser("merge", help="merge a text and a multimodal model at one or more alphas (streamed)")
    p.add_argument("--text", help="the text-only model (HF directory with safetensors)")
    p.add_argument("--mm", help="the multimodal model, same architecture")
    p.add_argument("--recipe", metavar="FILE.yaml",
                   help="instead of --text/--mm/--base/--method/--alpha: mergekit's YAML (models[0] the text model, "
                        "models[1] the multimodal one; docs/recipes.md)")
    p.add_argument("--method", help="linear (default), task_arithmetic, ties, dare, slerp, regmean, …")
    p.add_argument("--alpha", help="weight of the TEXT model; several: 0,0.1,0.2 (one read); none for a method "
                                   "without α (model_stock, sce)")
    p.add_argument("--base", help="shared initialisation, for methods on task vectors")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow alpha outside [0, 1]")
    p.add_argument("--out", required=True, help="output directory (alpha-X.XX/ inside it for several alphas)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=None, command=_merge)

    p = stage("probe", _probe, "the mergeability probe of a pair at a few α: held-out LM loss, caption loss with the "
              "true and with shuffled image features, and the distances (a few seconds an α)")
    p.add_argument("--text", required=True, help="the text model (a checkpoint)")
    p.add_argument("--mm", required=True, help="the multimodal model (a checkpoint)")
    p.add_argument("--method", default="linear", help="a merge method of the twins")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a method parameter")
    p.add_argument("--base", help="shared initialisation, for methods on task vectors")
    p.add_argument("--alpha", default="0,0.25,0.5,0.75,1", help="weights of the text model (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--out", help="also write the signals and distances to this JSON file")

    p = sub.add_parser("merge-experts", help="merge a modality-expert checkpoint into one plain (agnostic) model")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of the experts run")
    p.add_argument("--method", default="interpolation", help="interpolation, arithmetic or regmean")
    p.add_argument("--alpha", help="weight of the VISION expert (Sung et al.); several: 0.5,0.75 (default 0.5)")
    p.add_argument("--seed", help="arithmetic: the seed weights (the seed run's last checkpoint, or the "
                                  "experts run's words-0 checkpoint without seed pre-training)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="lam=…, gamma=…")
    p.add_argument("--out", required=True, help="output directory (alpha-X.XX/ inside it for several alphas)")
    p.set_defaults(handler=None, command=_merge_experts)

    p = sub.add_parser("distance", help="L2, cosine, SSD and TSSD between two models, whole and per layer")
    p.add_argument("--a", help="the text model")
    p.add_argument("--b", help="the multimodal model")
    p.add_argument("--experts", help="instead of --a/--b: an expert checkpoint, W^l vs W^v (and vs W^vl)")
    p.add_argument("--base", help="shared initialisation (experts: the seed): also measure the task vectors")
    p.add_argument("--model-only", action="store_true", help="whole-model distances only, no per-layer rows")
    p.add_argument("--device", default="auto", type=_device, help="auto (the GPU when one is visible), cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="Parquet file to write")
    p.set_defaults(handler=None, command=_distance)

    p = sub.add_parser("export-text", help="write a checkpoint's language model alone as a LlamaForCausalLM directory")
    p.add_argument("checkpoint", help="a run checkpoint (runs/<exp>/<run>/checkpoints/words-…)")
    p.add_argument("out", help="the directory to write")
    p.set_defaults(handler=None, command=_export_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options and an action ("sweep run --quiet a.b=1"): argparse would
    # have consumed the positionals already, so the rest arrives as unknown arguments.
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.handler is None:
            launch.use_allotted_cpus()
            args.command(args)
        else:
            cfg = load_config(args.config, args.overrides)
            launch.use_allotted_cpus(cfg.compute.threads)  # before any stage imports torch
            args.handler(cfg, args)
    except VlmergeError as e:
        print(f"vlmerge {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"vlmerge {args.stage}: {e}; run the same command again to resume", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        print(f"vlmerge {args.stage}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the system refused (read-only file system, full disk, permissions): one line too
        where = f"{e.filename}: " if e.filename else ""  # not every OSError names a file
        print(f"vlmerge {args.stage}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0
