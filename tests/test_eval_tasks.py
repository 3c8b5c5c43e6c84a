"""Task readers and metrics on small fixture files (and real BLiMP), with scores the tests choose."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from vlmerge.errors import VlmergeError
from vlmerge.evaluate.metrics import (accuracy_by, first_is_best, logprob_per_token, macro_mean, perplexity,
                                      unpaired_correct, winoground_scores)
from vlmerge.evaluate.tasks import TASKS, Request, Scores, get_task, register
from vlmerge.problems import ProblemLog


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a str row is written as it is (a malformed line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def scores(logprob: list[float], tokens: list[int] | None = None) -> Scores:
    return Scores(np.array(logprob, dtype=np.float64), np.array(tokens or [1] * len(logprob), dtype=np.int64))


def by_key(metrics) -> dict[tuple[str, str], tuple[float, int]]:
    return {(m.subtask, m.metric): (m.value, m.n) for m in metrics}


def run(name: str, path: Path, logprob: list[float] | None = None, tokens: list[int] | None = None):
    """load → requests → evaluate; logprob=None: score each request by a function of it (see callers)."""
    task, problems = get_task(name), ProblemLog()
    items = task.load(path, problems)
    reqs = task.requests(items)
    metrics, per_item = task.evaluate(items, scores(logprob, tokens)) if logprob is not None else ([], [])
    return items, reqs, by_key(metrics), per_item, problems


def pair(good: str, bad: str, **extra) -> dict:
    return {"sentence_good": good, "sentence_bad": bad, **extra}


# --- metrics -------------------------------------------------------------------------------------


def test_metric_functions_equal_hand_computed_values():
    assert accuracy_by(["b", "a", "b", "b"], [True, False, False, True]) == {"a": (0.0, 1), "b": (2 / 3, 3)}
    assert macro_mean({"a": (0.0, 1), "b": (2 / 3, 3)}) == (pytest.approx(1 / 3), 4)
    # candidates [-1, -2] [-2, -1] [-3, -3] [-1, -4, -0.5, -9] [-2, -2, -1]: right, wrong,
    # tie (right: BabyLM's arg-max takes the first maximum, the correct one), wrong, tie with a better one (wrong)
    chosen = first_is_best(np.array([-1, -2, -2, -1, -3, -3, -1, -4, -0.5, -9.0, -2, -2, -1]), [2, 2, 2, 4, 3])
    ref = [int(np.argmax(c)) == 0 for c in ([-1, -2], [-2, -1], [-3, -3], [-1, -4, -0.5, -9], [-2, -2, -1])]
    assert chosen.tolist() == ref == [True, False, True, False, False]
    # Σ logprob = -8 over 6 tokens
    assert logprob_per_token(np.array([-2.0, -1.5, -4.5]), np.array([2, 1, 3])) == pytest.approx(-4 / 3)
    assert perplexity(np.array([-2.0, -1.5, -4.5]), np.array([2, 1, 3])) == pytest.approx(math.exp(4 / 3))


def test_winoground_and_unpaired_metric_functions():
    s = np.array([[[-1, -3], [-2, -1.5]], [[-2, -1], [-3, -4]]])  # items A and B of the Winoground test below
    out = winoground_scores(s)
    assert [out[k].tolist() for k in ("text_score", "image_score", "group_score")] == [[True, False]] * 3
    assert unpaired_correct(s, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])).tolist() == [True, True, True, False]


# --- minimal pairs -------------------------------------------------------------------------------


def test_blimp_accuracy_per_uid_macro_mean_and_field(tmp_path):
    folder = tmp_path / "blimp"
    write_jsonl(folder / "agr_a.jsonl", [pair("g1", "b1", UID="agr_a", field="morphology", pairID="0"),
                                         pair("g2", "b2", UID="agr_a", field="morphology", pairID="1")])
    write_jsonl(folder / "agr_b.jsonl", [pair("g3", "b3", UID="agr_b", field="morphology", pairID="0")])
    write_jsonl(folder / "isl.jsonl", [pair("g4", "b4", UID="isl", field="syntax_semantics", pairID="7"),
                                       pair("g5", "b5", UID="isl", field="syntax_semantics", pairID="8")])
    # (good, bad): agr_a right, wrong -> 1/2; agr_b right -> 1; isl tie (right, as BabyLM), wrong -> 1/2
    lp = [-1, -2, -3, -2, -1, -5, -1, -1, -3, -2]
    items, reqs, m, per_item, problems = run("blimp", folder, lp)
    assert not problems
    assert reqs[:2] == [Request("g1", "", None, 0), Request("b1", "", None, 0)] and reqs[-1].group == 4
    assert m[("agr_a", "accuracy")] == (0.5, 2) and m[("agr_b", "accuracy")] == (1.0, 1)
    assert m[("isl", "accuracy")] == (0.5, 2)
    assert m[("", "accuracy")] == (pytest.approx(2 / 3), 5)  # (1/2 + 1 + 1/2) / 3, not 3/5
    # a field pools its pairs, as rank_and_evaluate counts per metadata value: 2 of 3, not (1/2 + 1) / 2
    assert m[("field:morphology", "accuracy")] == (pytest.approx(2 / 3), 3)
    assert m[("field:syntax/semantics", "accuracy")] == (0.5, 2)  # BabyLM's spelling of syntax_semantics
    assert [(i.item_id, i.subtask, i.value) for i in per_item] == [
        ("agr_a/0", "agr_a", 1.0), ("agr_a/1", "agr_a", 0.0), ("agr_b/0", "agr_b", 1.0),
        ("isl/7", "isl", 1.0), ("isl/8", "isl", 0.0)]


def test_blimp_supplement_and_minimal_pairs_take_the_file_stem_without_uid(tmp_path):
    folder = tmp_path / "supplement"
    write_jsonl(folder / "turn_taking.jsonl", [pair("A: Who left?\nB: Kim left.", "A: Who left?\nB: Kim did left.")])
    write_jsonl(folder / "hypernym.jsonl", [pair("g1", "b1"), pair("g2", "b2")])
    items, _, m, per_item, _ = run("blimp_supplement", folder, [-1, -2, -2, -1, -1, -3])
    assert [p.subtask for p in items] == ["hypernym", "hypernym", "turn_taking"]
    assert "\n" in items[2].good
    assert m == {("hypernym", "accuracy"): (0.5, 2), ("turn_taking", "accuracy"): (1.0, 1),
                 ("", "accuracy"): (0.75, 3)}  # no field rows: the supplement has no field
    assert [i.item_id for i in per_item] == ["hypernym/0", "hypernym/1", "turn_taking/0"]
    mixed = write_jsonl(tmp_path / "mine.jsonl", [pair("g", "b", UID="x"), pair("g", "b")])
    assert [p.subtask for p in run("minimal_pairs", mixed)[0]] == ["x", "mine"]


def test_real_blimp_files(real_blimp, tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for uid in ("adjunct_island", "principle_A_case_1", "principle_A_case_2"):
        (folder / f"{uid}.jsonl").symlink_to(real_blimp / f"{uid}.jsonl")
    items, reqs, _, _, problems = run("blimp", folder)
    assert len(items) == 3000 and len(reqs) == 6000 and not problems
    assert items[0].item_id == "adjunct_island/0" and reqs[0].target == items[0].good
    # the good sentence wins everywhere but in adjunct_island
    lp = [x for p in items for x in ((-2.0, -1.0) if p.subtask == "adjunct_island" else (-1.0, -2.0))]
    _, _, m, per_item, _ = run("blimp", folder, lp)
    assert m[("adjunct_island", "accuracy")] == (0.0, 1000) and m[("principle_A_case_1", "accuracy")] == (1.0, 1000)
    assert m[("", "accuracy")] == (pytest.approx(2 / 3), 3000)
    assert m[("field:syntax", "accuracy")] == (0.0, 1000)
    # the original BLiMP spells this field two ways; both paradigms land in one
    assert m[("field:syntax/semantics", "accuracy")] == (1.0, 2000)
    assert len(per_item) == 3000


def test_malformed_lines_are_reported_counted_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [pair("g1", "b1"), "{not json", {"sentence_good": "g"}, "[1, 2]",
                                              pair("g2", "b2")])
    items, _, _, _, problems = run("blimp", path)
    assert [p.good for p in items] == ["g1", "g2"]
    assert [where for where, _ in problems.items] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert problems.kinds() == {"malformed line": 3}
    assert "'sentence_bad'" in problems.items[1][1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_empty_folder_or_missing_path_is_one_line_error_naming_it(name, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not data")
    for path in (empty, tmp_path / "missing"):
        with pytest.raises(VlmergeError) as e:
            get_task(name).load(path, ProblemLog())
        assert str(path) in str(e.value) and "\n" not in str(e.value) and "expected" in str(e.value)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(VlmergeError, match="unknown task 'nope'") as e:
        get_task("nope")
    assert all(name in str(e.value) for name in ("blimp", "blimp_supplement", "ewok", "minimal_pairs",
                                                  "perplexity", "vqa", "winoground", "winoground_full"))


# --- EWoK ----------------------------------------------------------------------------------------


def ewok(domain: str, n: int) -> dict:
    return {"Domain": domain, "Context1": f"c1-{n}", "Context2": f"c2-{n}", "Target1": f"t1-{n}",
            "Target2": f"t2-{n}", "ContextType": "concrete", "ContextDiff": "x", "TargetDiff": "y"}


def test_ewok_babylm_jsonl_scores_target1_against_target2_given_context1(tmp_path):
    folder = tmp_path / "ewok_filtered"
    write_jsonl(folder / "social-interactions.jsonl", [ewok("social-interactions", 0), ewok("social-interactions", 1)])
    write_jsonl(folder / "spatial-relations.jsonl", [ewok("spatial-relations", 2)])
    # lines: right, wrong (social 1/2); right (spatial 1)
    items, reqs, m, per_item, _ = run("ewok", folder, [-1, -2, -4, -3, -5, -6])
    assert reqs[:2] == [Request(" t1-0", "c1-0", None, 0), Request(" t2-0", "c1-0", None, 0)]
    assert m == {("social-interactions", "accuracy"): (0.5, 2), ("spatial-relations", "accuracy"): (1.0, 1),
                 ("", "accuracy"): (0.75, 3)}
    assert [(i.item_id, i.value) for i in per_item] == [
        ("social-interactions/0", 1.0), ("social-interactions/1", 0.0), ("spatial-relations/0", 1.0)]


def test_ewok_csv_row_expands_into_the_line_and_its_swapped_copy(tmp_path):
    path = tmp_path / "ewok.csv"
    path.write_text("Domain,Context1,Context2,Target1,Target2\nagent-properties,A c1,A c2,A t1,A t2\n"
                    "agent-properties,,,,\n", encoding="utf-8")
    items, reqs, m, _, problems = run("ewok", path, [-1, -2, -3, -1])
    assert [(r.context, r.target) for r in reqs] == [("A c1", " A t1"), ("A c1", " A t2"),
                                                      ("A c2", " A t2"), ("A c2", " A t1")]
    assert m[("", "accuracy")] == (0.5, 2)  # T1 wins given C1; T1 (wrongly) wins given C2
    assert [where for where, _ in problems.items] == [f"{path}:3"]


# --- Winoground ----------------------------------------------------------------------------------

# Three items; s(c, i) = score of caption c with image i.
#          s00   s01   s10   s11  | text: s00>s10 & s11>s01 | image: s00>s01 & s11>s10 | group | unpaired
# A Obj    -1    -3    -2    -1.5 |   1                     |   1                      |   1   | i0 ✓ i1 ✓
# B Rel    -2    -1    -3    -4   |   0 (s11 < s01)         |   0 (s00 < s01)          |   0   | i0 ✓ i1 ✗
# C Obj    -3    -4    -2    -1   |   0 (s00 < s10)         |   1                      |   0   | i0 ✗ i1 ✓
# text 1/3, image 2/3, group 1/3, unpaired 4/6; Object: 1/2, 1, 1/2, 3/4; Relation: 0, 0, 0, 1/2.
WINO = {"A": ("Object", [-1, -3, -2, -1.5]), "B": ("Relation", [-2, -1, -3, -4]), "C": ("Object", [-3, -4, -2, -1])}


def wino_scores(reqs: list[Request], table: dict[tuple[str, str], float]) -> list[float]:
    return [table[(r.target, r.image)] for r in reqs]


def hf_table() -> dict[tuple[str, str], float]:
    table = {}
    for n, (_, (s00, s01, s10, s11)) in enumerate(WINO.values()):
        c0, c1, i0, i1 = f"cap {n} 0", f"cap {n} 1", f"ex_{n}_img_0", f"ex_{n}_img_1"
        table |= {(c0, i0): s00, (c0, i1): s01, (c1, i0): s10, (c1, i1): s11}
    return table


def test_winoground_hugging_face_format_text_image_group_unpaired(tmp_path):
    rows = [{"id": n, "caption_0": f"cap {n} 0", "caption_1": f"cap {n} 1", "image_0": f"ex_{n}_img_0",
             "image_1": f"ex_{n}_img_1", "tag": "t", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": tag}
            for n, (tag, _) in enumerate(WINO.values())]
    path = write_jsonl(tmp_path / "examples.jsonl", rows)
    items, reqs, _, _, _ = run("winoground", path)
    assert [(r.target, r.image, r.context, r.group) for r in reqs[:4]] == [
        ("cap 0 0", "ex_0_img_0", "", 0), ("cap 0 0", "ex_0_img_1", "", 0),
        ("cap 0 1", "ex_0_img_0", "", 0), ("cap 0 1", "ex_0_img_1", "", 0)]
    _, _, m, per_item, _ = run("winoground", path, wino_scores(reqs, hf_table()))
    assert m[("", "text_score")] == (pytest.approx(1 / 3), 3) and m[("", "image_score")] == (pytest.approx(2 / 3), 3)
    assert m[("", "group_score")] == (pytest.approx(1 / 3), 3)
    assert m[("", "unpaired_accuracy")] == (pytest.approx(4 / 6), 6)
    assert [m[("tag:Object", k)] for k in ("text_score", "image_score", "group_score", "unpaired_accuracy")] == [
        (0.5, 2), (1.0, 2), (0.5, 2), (0.75, 4)]
    assert [m[("tag:Relation", k)] for k in ("text_score", "image_score", "group_score", "unpaired_accuracy")] == [
        (0.0, 1), (0.0, 1), (0.0, 1), (0.5, 2)]
    values = {i.item_id: (i.subtask, i.value) for i in per_item}
    assert values["2/image_score"] == ("tag:Object", 1.0) and values["2/unpaired_accuracy/ex_2_img_0"][1] == 0.0
    assert len(per_item) == 3 * 3 + 6


def test_winoground_babylm_filtered_rows_map_to_feature_store_ids(tmp_path):
    def row(idx, key, own, other):
        return {"id": 0, "image_idx": idx, "image_key": key, "caption_0": own, "caption_1": other,
                "tag": "t", "secondary_tag": "", "collapsed_tag": WINO["AB"[idx]][0]}

    path = write_jsonl(tmp_path / "winoground_filtered" / "winoground.jsonl", [
        row(0, "image_0", "cap 0 0", "cap 0 1"), row(0, "image_1", "cap 0 1", "cap 0 0"),  # item A, both images
        row(1, "image_1", "cap 1 1", "cap 1 0"),  # item B, only its second image has a line
        row(1, "image_1", "cap 1 1", "oops"), {"image_idx": 2, "image_key": "image_2"},
        {"image_idx": 3, "image_key": ["image_0"]}])
    items, reqs, _, _, problems = run("winoground", path.parent)
    assert [(it.item_id, it.captions, it.images, it.unpaired) for it in items] == [
        ("0", ("cap 0 0", "cap 0 1"), ("ex_0_img_0", "ex_0_img_1"), (0, 1)),
        ("1", ("cap 1 0", "cap 1 1"), ("ex_1_img_0", "ex_1_img_1"), (1,))]
    assert [where for where, _ in problems.items] == [f"{path}:4", f"{path}:5", f"{path}:6"]
    _, _, m, _, _ = run("winoground", path.parent, wino_scores(reqs, hf_table()))
    # A: text, image, group right, unpaired 2/2; B: all wrong, and its image 1 comparison is wrong
    assert m[("", "text_score")] == (0.5, 2) and m[("", "unpaired_accuracy")] == (pytest.approx(2 / 3), 3)


def hf_row(n: int, tag: str) -> dict:
    return {"id": n, "caption_0": f"cap {n} 0", "caption_1": f"cap {n} 1", "image_0": f"ex_{n}_img_0",
            "image_1": f"ex_{n}_img_1", "tag": "t", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": tag}


def test_winoground_full_unpaired_text_score_counts_both_images_of_every_item(tmp_path):
    # s(c, i):   s00  s01  s10  s11   | text (strict) | image | unpaired: s(own, i) >= s(other, i)
    # 0 Object   -1   -2   -3   -0.5  |  1            |  1    | i0 -1 >= -3 ✓, i1 -0.5 >= -2 ✓
    # 1 Relation -5   -2   -4   -2    |  0 (-5 < -4)  |  0    | i0 -5 < -4 ✗, i1 -2 >= -2 ✓ (a tie counts)
    # text 1/2, image 1/2, group 1/2; unpaired 3/4 (n = 4 images); Object 2/2, Relation 1/2.
    path = write_jsonl(tmp_path / "examples.jsonl", [hf_row(0, "Object"), hf_row(1, "Relation")])
    table = {("cap 0 0", "ex_0_img_0"): -1, ("cap 0 0", "ex_0_img_1"): -2, ("cap 0 1", "ex_0_img_0"): -3,
             ("cap 0 1", "ex_0_img_1"): -0.5, ("cap 1 0", "ex_1_img_0"): -5, ("cap 1 0", "ex_1_img_1"): -2,
             ("cap 1 1", "ex_1_img_0"): -4, ("cap 1 1", "ex_1_img_1"): -2}
    items, reqs, _, _, problems = run("winoground_full", path)
    assert [it.unpaired for it in items] == [(0, 1), (0, 1)] and not problems
    _, _, m, per_item, _ = run("winoground_full", path, wino_scores(reqs, table))
    assert m[("", "unpaired_accuracy")] == (0.75, 4) and m[("", "text_score")] == (0.5, 2)
    assert m[("", "image_score")] == (0.5, 2) and m[("", "group_score")] == (0.5, 2)
    assert m[("tag:Object", "unpaired_accuracy")] == (1.0, 2) and m[("tag:Relation", "unpaired_accuracy")] == (0.5, 2)
    values = {i.item_id: i.value for i in per_item}
    assert values["1/unpaired_accuracy/ex_1_img_0"] == 0.0 and values["1/unpaired_accuracy/ex_1_img_1"] == 1.0
    # the same metrics, by name and value, as winoground on the same file
    assert m == run("winoground", path, wino_scores(reqs, table))[2]


def test_winoground_full_records_a_filtered_line_as_a_problem_winoground_loads_it(tmp_path):
    filtered = {"id": 0, "image_idx": 1, "image_key": "image_1", "caption_0": "cap 1 1", "caption_1": "cap 1 0",
                "tag": "t", "secondary_tag": "", "collapsed_tag": "Object"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [hf_row(0, "Object"), filtered])
    items, _, _, _, problems = run("winoground_full", path)
    assert [(it.item_id, it.unpaired) for it in items] == [("0", (0, 1))]
    assert [where for where, _ in problems.items] == [f"{path}:2"]
    assert problems.kinds() == {"BabyLM's filtered per-image line": 1}
    assert "point task winoground at this file" in problems.items[0][1]
    items, _, _, _, problems = run("winoground", path)
    assert [(it.item_id, it.unpaired) for it in items] == [("0", (0, 1)), ("1", (1,))] and not problems


def test_winoground_full_has_no_babylm_export_and_its_name_is_taken():
    task = get_task("winoground_full")
    assert (task.predict, task.babylm, task.needs_images) == (None, "", True)
    with pytest.raises(ValueError, match="task 'winoground_full' is registered twice"):
        register(dataclasses.replace(task))
    assert TASKS["winoground_full"] is task


# --- VQA and perplexity --------------------------------------------------------------------------


def test_vqa_eight_way_choice(tmp_path):
    def q(n: int) -> dict:
        return {"idx_in_hf_dataset": n, "target_ans": f"yes{n}", "distractors": [f"d{n}{k}" for k in range(7)],
                "question": f"Is it {n}?", "image_id": 100 + n, "question_id": 1000 + n}

    path = write_jsonl(tmp_path / "vqa_filtered" / "vqa.jsonl", [q(0), {**q(9), "distractors": []}, q(1)])
    items, reqs, _, _, problems = run("vqa", path.parent)
    assert len(items) == 2 and len(reqs) == 16 and problems.kinds() == {"malformed line": 1}
    # BabyLM's decode_vqa: " " + answer after the bare question
    assert reqs[0] == Request(" yes0", "Is it 0?", "100", 0)
    assert reqs[9] == Request(" d10", "Is it 1?", "101", 1)
    # item 0: the target is best; item 1: a distractor beats it
    _, _, m, per_item, _ = run("vqa", path, [-1, -2, -3, -4, -5, -6, -7, -8] + [-3, -9, -2, -9, -9, -9, -9, -9])
    assert m == {("", "accuracy"): (0.5, 2)}
    assert [(i.item_id, i.value) for i in per_item] == [("1000", 1.0), ("1001", 0.0)]


def test_perplexity_token_weighted(tmp_path):
    folder = tmp_path / "held_out"
    folder.mkdir()
    (folder / "a.test").write_text("the dog runs .\n\n  a cat  \n", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"ok \xff\n" + "three words here\n".encode())
    (folder / "c.json").write_text("ignored\n")
    items, reqs, m, per_item, problems = run("perplexity", folder, [-2.0, -1.5, -4.5], [2, 1, 3])
    assert items == ["the dog runs .", "a cat", "three words here"] and reqs[1] == Request("a cat", "", None, 1)
    assert [where for where, _ in problems.items] == [f"{folder / 'b.txt'}:1"]
    assert m[("", "perplexity")] == (pytest.approx(math.exp(8 / 6)), 3)  # exp(-Σ lp / Σ tokens), not a mean of lines
    assert m[("", "logprob_per_token")] == (pytest.approx(-8 / 6), 3) and per_item == []
