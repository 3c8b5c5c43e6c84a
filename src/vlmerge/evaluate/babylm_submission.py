"""A BabyLM 2025 submission: a run's checkpoints as the leaderboard's `chck_<n>M` revisions
(`vlmerge export-babylm --run RUN --out DIR`), and the check that a pipeline results folder
`results/<model>/` holds every file collate_preds.py reads, with the item counts it asserts
(`vlmerge export-babylm --check results/<model> --track TRACK`).

The rules are those of github.com/babylm/evaluation-pipeline-2025 at bf55c11 (line numbers below
are of evaluation_pipeline/collate_preds.py there): `collate_preds.sh` always passes `--fast`, so a
submission is the full evaluation of `main` plus the fast evaluation of every revision of the
track. Only the causal backend is checked (`zero_shot/causal/…`): our models are causal LMs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, read_json, remove_stale_temps, write_json
from vlmerge.layout import (BABYLM_MAIN, BABYLM_REVISION_MILLIONS, STATISTICS_PREFIX, CheckpointRef, babylm_aoa_surprisal,
                            babylm_devbench_file, babylm_export_source, babylm_finetune_predictions, babylm_predictions,
                            babylm_revision, list_checkpoints)

TRACKS = ("strict-small", "strict", "multimodal", "interaction")  # collate_preds.py --track (line 196)
REVISION_RULE = "1M…10M by 1M, 20M…100M by 10M, 200M…1000M by 100M"


# --- export ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What one `export_run` did: revisions written, revisions already there, checkpoints at no revision."""

    written: list[str]
    kept: list[str]
    skipped: list[Path]
    main: Path


def export_run(run_dir: Path, out: Path, *, text_only: bool = False) -> ExportSummary:
    """Write each checkpoint of the run at a revision's words as `out/<revision>/`, the last as `out/main/`."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise VlmergeError(f"{run_dir}: no complete checkpoint; train the run first")
    named = [(babylm_revision(CheckpointRef.parse(c).words), c) for c in checkpoints]
    matched = [(r, c) for r, c in named if r]
    if not matched:
        first, last = CheckpointRef.parse(checkpoints[0]).words, CheckpointRef.parse(checkpoints[-1]).words
        raise VlmergeError(f"{run_dir}: no checkpoint at a BabyLM revision's words ({REVISION_RULE}); its "
                           f"{len(checkpoints)} checkpoint(s) run from {first:,} to {last:,} words")
    remove_stale_temps(out)  # a killed export's temp folders
    written, kept = [], []
    for revision, checkpoint in [*matched, (BABYLM_MAIN, checkpoints[-1])]:
        (written if export_revision(checkpoint, out / revision, text_only=text_only) else kept).append(revision)
    return ExportSummary(written, kept, [c for r, c in named if r is None], checkpoints[-1])


def export_revision(checkpoint: Path, dest: Path, *, text_only: bool = False) -> bool:
    """Write one revision folder from a checkpoint, atomically; False when it is already there from it."""
    source = {**dataclasses.asdict(CheckpointRef.parse(checkpoint)), "text_only": text_only}
    if dest.exists():
        # Complete (renamed into place whole); refuse one written from another checkpoint or format
        # (e.g. `main` after the run went on): never replaced silently.
        found = read_json(babylm_export_source(dest)) if babylm_export_source(dest).is_file() else None
        if found != source:
            raise VlmergeError(f"{dest}: already exported from {found or 'something else'}, not {source}; "
                               f"remove it to export it again")
        return False
    with atomic_path(dest, is_dir=True) as tmp:
        if text_only:
            from vlmerge.model import export_text  # torch: only here

            tmp.rmdir()  # export_text writes the folder whole itself, at our temp name
            export_text(checkpoint, tmp)
        else:
            for f in sorted(checkpoint.iterdir()):
                if f.is_file() and not f.name.startswith(STATISTICS_PREFIX):  # merging's statistics are no part of the model
                    _link_or_copy(f, tmp / f.name)
        write_json(babylm_export_source(tmp), source)
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link for the weights where the file system allows (no second copy on disk), else a copy."""
    # Only our own files: the atomic rename sets the modes of what it moves into place, and on a
    # link that is the checkpoint's file too (another user's cannot be changed).
    if src.suffix == ".safetensors" and src.stat().st_uid == os.getuid():
        try:
            os.link(src, dst)
            return
        except OSError:  # another device (EXDEV), or links unsupported or refused (EPERM)
            pass
    shutil.copy2(src, dst)


def export_command(run_dir: Path, out: Path, *, text_only: bool = False) -> ExportSummary:
    """`vlmerge export-babylm --run RUN --out DIR`: export and print one summary line."""
    s = export_run(run_dir, out, text_only=text_only)
    kept = f", {len(s.kept)} already there" if s.kept else ""
    skipped = f"; skipped (at no revision's words): {', '.join(c.name for c in s.skipped)}" if s.skipped else ""
    print(f"export-babylm: {len(s.written)} revision(s) written ({', '.join(s.written) or 'none'}){kept} -> {out}; "
          f"main = {s.main.name}{skipped}")
    return s


# --- the collation check --------------------------------------------------------------------------

# Item counts that collate_preds.py asserts (`_check_size`, lines 313-336): per subtask (a key of the
# predictions.json, lowercased) one number for every subtask, or one per named subtask.
BLIMP_FAST_SIZE, SUPPLEMENT_FAST_SIZE, EWOK_FAST_SIZE = 200, 50, 100  # lines 19-21
ENTITY_TRACKING_FAST_SIZES = {f"regular_{k}_ops": n for k, n in enumerate((606, 607, 606, 606, 568, 159))}  # line 22
READING_SIZE, WUG_ADJ_SIZE, WUG_PAST_SIZE = 1726, 200, 50  # lines 24-26
WINOGROUND_SIZE, VQA_SIZE = 746, 25230  # lines 28-29
DEVBENCH_SHAPES = {"lex-viz_vocab.npy": (119, 4, 1), "gram-trog.npy": (76, 4, 1),  # line 30, files lines 300-307
                   "sem-things_pairwise_sims.npy": (1854, 1854)}
AOA_SIZE = 8005  # line 32: surprisal rows per revision
BLIMP_SIZES = {  # lines 34-102
    "superlative_quantifiers_2": 986, "superlative_quantifiers_1": 979, "anaphor_gender_agreement": 971,
    "principle_a_reconstruction": 967, "irregular_past_participle_adjectives": 961, "sentential_subject_island": 961,
    "wh_island": 960, "left_branch_island_simple_question": 951,
    "coordinate_structure_constraint_object_extraction": 949,
    "tough_vs_raising_1": 948, "left_branch_island_echo_question": 947, "principle_a_c_command": 946,
    "regular_plural_subject_verb_agreement_2": 945, "irregular_past_participle_verbs": 942,
    "determiner_noun_agreement_with_adj_2": 941, "principle_a_domain_3": 941,
    "determiner_noun_agreement_with_adjective_1": 933, "anaphor_number_agreement": 931,
    "determiner_noun_agreement_2": 931, "existential_there_quantifiers_1": 930, "determiner_noun_agreement_1": 929,
    "matrix_question_npi_licensor_present": 929, "adjunct_island": 928, "existential_there_subject_raising": 924,
    "animate_subject_trans": 923, "drop_argument": 920, "tough_vs_raising_2": 920, "wh_vs_that_with_gap": 919,
    "sentential_negation_npi_licensor_present": 919, "principle_a_case_2": 915, "principle_a_domain_2": 915,
    "principle_a_domain_1": 914, "npi_present_2": 914, "principle_a_case_1": 912,
    "existential_there_quantifiers_2": 911,
    "wh_vs_that_with_gap_long_distance": 910, "npi_present_1": 909,
    "coordinate_structure_constraint_complex_left_branch": 906, "passive_2": 903, "wh_questions_subject_gap": 898,
    "animate_subject_passive": 895, "irregular_plural_subject_verb_agreement_2": 892,
    "regular_plural_subject_verb_agreement_1": 890, "only_npi_licensor_present": 882,
    "wh_vs_that_no_gap_long_distance": 875, "distractor_agreement_relative_clause": 871,
    "sentential_negation_npi_scope": 871, "intransitive": 868, "transitive": 868, "wh_vs_that_no_gap": 861,
    "wh_questions_object_gap": 859, "wh_questions_subject_gap_long_distance": 857, "inchoative": 855,
    "complex_np_island": 846, "passive_1": 840, "determiner_noun_agreement_with_adj_irregular_2": 840,
    "only_npi_scope": 837, "ellipsis_n_bar_2": 828, "determiner_noun_agreement_irregular_2": 820, "causative": 818,
    "existential_there_object_raising": 812, "irregular_plural_subject_verb_agreement_1": 804, "ellipsis_n_bar_1": 802,
    "distractor_agreement_relational_noun": 788, "expletive_it_object_raising": 759,
    "determiner_noun_agreement_with_adj_irregular_1": 718, "determiner_noun_agreement_irregular_1": 681,
}
SUPPLEMENT_SIZES = {"hypernym": 842, "qa_congruence_easy": 64, "qa_congruence_tricky": 165,  # line 104
                    "subject_aux_inversion": 3867, "turn_taking": 280}
EWOK_SIZES = {  # lines 106-118
    "agent-properties": 2210, "social-relations": 1548, "physical-relations": 818, "material-dynamics": 770,
    "physical-interactions": 556, "spatial-relations": 490, "social-properties": 328, "quantitative-properties": 314,
    "social-interactions": 294, "material-properties": 170, "physical-dynamics": 120,
}
ENTITY_TRACKING_SIZES = {  # lines 120-139
    f"{kind}_{k}_ops": n for kind, sizes in (("regular", (606, 607, 606, 606, 568, 159)),
                                             ("ambiref", (607, 607, 604, 604, 615, 187)),
                                             ("move_contents", (605, 606, 605, 606, 529, 156)))
    for k, n in enumerate(sizes)
}
COMPS_SIZES = {"base": 49340, "wugs_dist_before": 13896, "wugs_dist_in_between": 13896, "wugs": 13896}  # 140-145
FINETUNE_SIZES = {"boolq": 1635, "mnli": 4908, "mrpc": 204, "multirc": 2424, "qqp": 20215, "rte": 139,  # 146-152
                  "wsc": 52}

Sizes = int | dict[str, int]
# (task, dataset, sizes) of the zero-shot files under zero_shot/causal/, as `_check_validity_of_dir`
# requires them (fast: lines 222-243; full: lines 244-292) and `get_revision_fast_eval_metrics` /
# `collate_full_eval_preds` size them (FAST_SIZES / FULL_SIZES, lines 154-181).
FAST_FILES: list[tuple[str, str, Sizes]] = [
    ("blimp", "blimp_fast", BLIMP_FAST_SIZE), ("blimp", "supplement_fast", SUPPLEMENT_FAST_SIZE),
    ("ewok", "ewok_fast", EWOK_FAST_SIZE), ("entity_tracking", "entity_tracking_fast", ENTITY_TRACKING_FAST_SIZES),
    ("wug_adj", "wug_adj_nominalization", WUG_ADJ_SIZE), ("wug_past", "wug_past_tense", WUG_PAST_SIZE),
    ("reading", "reading", READING_SIZE),
]
FULL_FILES: list[tuple[str, str, Sizes]] = [
    ("blimp", "blimp_filtered", BLIMP_SIZES), ("blimp", "supplement_filtered", SUPPLEMENT_SIZES),
    ("ewok", "ewok_filtered", EWOK_SIZES), ("entity_tracking", "entity_tracking", ENTITY_TRACKING_SIZES),
    ("wug_adj", "wug_adj_nominalization", WUG_ADJ_SIZE), ("wug_past", "wug_past_tense", WUG_PAST_SIZE),
    ("comps", "comps", COMPS_SIZES), ("reading", "reading", READING_SIZE),
]
MULTIMODAL_FILES: list[tuple[str, str, Sizes]] = [  # args.multimodal: lines 293-299
    ("vqa", "vqa_filtered", VQA_SIZE), ("winoground", "winoground_filtered", WINOGROUND_SIZE),
]


def fast_revisions(track: str) -> list[str]:
    """The revisions whose fast results collate_preds.py reads: STRICT_SMALL_FAST_REVISIONS for
    strict-small (1M…100M), OTHER_FAST_REVISIONS for the other tracks (1M…1000M) (lines 16-17, 210)."""
    if track not in TRACKS:
        raise VlmergeError(f"track {track!r}: expected one of {', '.join(TRACKS)}")
    return [babylm_revision(n * 1_000_000) for n in BABYLM_REVISION_MILLIONS if track != "strict-small" or n <= 100]


@dataclasses.dataclass(frozen=True)
class Expected:
    """One file collate_preds.py reads in a revision folder, and what it must hold."""

    path: Path  # relative to results/<model>/<revision>
    kind: str  # "predictions" (subtask -> {"predictions": […]}), "aoa" (surprisal.json) or "devbench" (.npy)
    sizes: Sizes | tuple[int, ...] | None = None


def expected_files(track: str, revision: str) -> list[Expected]:
    """The files of one revision folder: `main` the full evaluation, a `chck_<n>M` the fast one."""
    if revision != BABYLM_MAIN:
        return [Expected(babylm_predictions(Path(), t, d), "predictions", n) for t, d, n in FAST_FILES]
    files = [Expected(babylm_finetune_predictions(Path(), t), "predictions", n) for t, n in FINETUNE_SIZES.items()]
    files += [Expected(babylm_predictions(Path(), t, d), "predictions", n) for t, d, n in FULL_FILES]
    files.append(Expected(babylm_aoa_surprisal(Path()), "aoa"))
    if track == "multimodal":
        files += [Expected(babylm_predictions(Path(), t, d), "predictions", n) for t, d, n in MULTIMODAL_FILES]
        files += [Expected(babylm_devbench_file(Path(), f), "devbench", s) for f, s in DEVBENCH_SHAPES.items()]
    return files


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One expected file of one revision: None, or what is wrong with it."""

    revision: str
    path: Path
    problem: str | None


def check_results(model_dir: Path, track: str) -> list[CheckRow]:
    """Every file collate_preds.py --fast --track TRACK reads under `model_dir` (its results/<model>), checked."""
    if not model_dir.is_dir():
        raise VlmergeError(f"{model_dir}: not a folder (expected the pipeline's results/<model>)")
    revisions = fast_revisions(track)
    return [CheckRow(revision, e.path, _problem(model_dir / revision / e.path, e, revisions))
            for revision in [BABYLM_MAIN, *revisions] for e in expected_files(track, revision)]


def _problem(path: Path, e: Expected, revisions: list[str]) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        if e.kind == "devbench":
            import numpy as np  # here: the CLI imports this module to build its parser

            return _devbench_problem(np.load(path, allow_pickle=False), e.sizes)
        data = json.loads(path.read_text(encoding="utf-8"))
        return _aoa_problem(data, revisions) if e.kind == "aoa" else _count_problem(data, e.sizes)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # unreadable, or not the pipeline's shape
        return f"unreadable: {type(err).__name__}: {err}"


def _count_problem(results: dict, sizes: Sizes) -> str | None:
    """`_check_size` (lines 313-336), stricter: also no subtask, an unknown one, a named one absent."""
    # The official check sizes only the subtasks present and fails on an unknown one with a KeyError.
    counts = {key.lower(): len(value["predictions"]) for key, value in results.items()}
    if not counts:
        return "no subtasks"
    wanted = sizes if isinstance(sizes, dict) else dict.fromkeys(counts, sizes)
    wrong = [f"{k}: {n} items, expected {wanted[k]}" for k, n in counts.items() if k in wanted and n != wanted[k]]
    wrong += [f"{k}: unexpected subtask" for k in counts if k not in wanted]
    wrong += [f"{k}: missing subtask" for k in wanted if k not in counts]
    return _joined(wrong)


def _aoa_problem(data: dict, revisions: list[str]) -> str | None:
    """`_check_size_aoa` (lines 339-361): exactly the track's revisions as steps, AOA_SIZE rows each."""
    per_step: dict[str, int] = {}
    for row in data["results"]:
        per_step[row["step"]] = per_step.get(row["step"], 0) + 1
    wrong = [f"{r}: no rows" for r in revisions if r not in per_step]
    wrong += [f"{s}: not a revision of the track" for s in per_step if s not in revisions]
    wrong += [f"{r}: {per_step[r]} rows, expected {AOA_SIZE}" for r in revisions
              if per_step.get(r, AOA_SIZE) != AOA_SIZE]
    return _joined(wrong)


def _devbench_problem(array, shape: tuple[int, ...]) -> str | None:
    """`_check_size_devbench` (lines 364-375): the shape, and floats."""
    wrong = [f"shape {array.shape}, expected {shape}"] if array.shape != shape else []
    wrong += [f"dtype {array.dtype}, expected floats"] if not str(array.dtype).startswith("float") else []
    return _joined(wrong)


def _joined(problems: list[str], most: int = 3) -> str | None:
    if not problems:
        return None
    more = f" (and {len(problems) - most} more)" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def format_check(rows: list[CheckRow]) -> str:
    """A table of files found and correct per revision, then one line per missing or wrong file."""
    revisions = list(dict.fromkeys(r.revision for r in rows))
    width = max(len(r) for r in revisions + ["revision"])
    lines = [f"{'revision':<{width}}  files  ok  missing  wrong"]
    for revision in revisions:
        mine = [r for r in rows if r.revision == revision]
        missing = sum(r.problem == "missing" for r in mine)
        wrong = sum(r.problem not in (None, "missing") for r in mine)
        lines.append(f"{revision:<{width}}  {len(mine):>5}  {len(mine) - missing - wrong:>2}  {missing:>7}  {wrong:>5}")
    bad = [r for r in rows if r.problem]
    if bad:
        lines += ["", f"{'revision':<{width}}  file: problem"]
        lines += [f"{r.revision:<{width}}  {r.path}: {r.problem}" for r in bad]
    return "\n".join(lines)


def check_command(model_dir: Path, track: str) -> list[CheckRow]:
    """`vlmerge export-babylm --check results/<model> --track TRACK`: the table, and an error if anything is wrong."""
    rows = check_results(model_dir, track)
    print(format_check(rows))
    bad = [r for r in rows if r.problem]
    if bad:
        named = _joined([f"{r.revision}/{r.path} ({r.problem})" for r in bad])
        raise VlmergeError(f"{model_dir}: {len(bad)} of {len(rows)} file(s) missing or wrong for the {track} track: "
                           f"{named}")
    print(f"export-babylm --check: {model_dir}: all {len(rows)} file(s) of the {track} track present, "
          f"with the expected item counts")
    return rows
