"""The downstream vision-language sets of Sung et al. (EMNLP 2023): readers of the official VQAv2,
Karpathy (COCO, Flickr30k) and NLVR² layouts, and the VQA and retrieval metrics.

Fixture files are written here in the release layouts, with awkward answers and malformed records.
Expected values are worked out by hand (in the comments) from the official rules, vqaEval.py's
normalisation and leave-one-out accuracy, ViLT's vocabulary and `get_score`, and checked again
against references written here one item at a time; nothing is taken from the code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from vlmerge.errors import VlmergeError
from vlmerge.finetune.metrics import retrieval_recalls, vqa_score
from vlmerge.finetune.vl_data import (
    Nlvr2Item, RetrievalImage, VqaQuestion, normalize_answer, read_karpathy, read_nlvr2, read_vqa, vqa_answer_vocab,
    vqa_targets)
from vlmerge.problems import ProblemLog


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------------------------------------- VQAv2

# vqaEval.py: punctuation (a mark beside a space, or any mark when a digit,digit comma is present, is
# dropped; otherwise it becomes a space; '.' goes unless a digit follows), then lower case, number
# words to digits, articles out, contractions given their apostrophe.
NORMALISED = [
    ("Two", "2"), ("a dog.", "dog"), ("dont", "don't"), ("yes!", "yes"), ("YES", "yes"),
    ("10,000", "10000"),  # digit,digit comma: every mark dropped, none spaced
    ("hot-dog", "hot dog"), ("t - shirt", "t shirt"),  # '-' between letters splits; beside a space it goes
    ("3.5", "3.5"), ("Mr. Smith", "mr smith"), ("none", "0"), ("The Dog", "dog"), ("an apple", "apple"),
    ("yes, it is", "yes it is"), ("$5", "$5"),  # '$' is not one of the marks
    ("one-way", "1 way"), ("isnt", "isn't"), ("Im", "im"),  # the table's "Im" key is never reached (lower-cased)
    ("\tyes\n", "yes"), ("what's up?", "what's up"),  # the apostrophe is kept
]


@pytest.mark.parametrize("raw, expected", NORMALISED)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


QUESTIONS = {
    "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
    "questions": [
        {"image_id": 42, "question": "How many dogs are there?", "question_id": 420},
        {"image_id": 42, "question": " What is it? ", "question_id": 421},
        {"image_id": 393225, "question": "Is it sunny?", "question_id": 393225000},
        {"image_id": "7", "question": "Where?", "question_id": 71},  # [3] image_id a string
        {"image_id": 9, "question": "Not annotated?", "question_id": 90},  # [4] no annotation
        {"image_id": 42, "question": "Again?", "question_id": 420},  # [5] repeats a question id
    ],
}


def annotation(qid: int, image_id: int, answers: list[str], major: str) -> dict:
    return {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": "other",
            "multiple_choice_answer": major,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


ANNOTATIONS = {
    "info": {}, "license": {}, "data_subtype": "val2014",
    "annotations": [
        # normalised: seven "2", three "3"
        annotation(420, 42, ["Two", "2", "two", "2.", "3", "three", "2", "two", "Three", "2"], "2"),
        # normalised: seven "dog", one each of "dogs", "puppy", "cat"
        annotation(421, 42, ["a dog.", "dog", "Dog", "dogs", "The dog", "puppy", "dog!", "dog", "a dog", "cat"],
                   "dog"),
        # normalised: six "yes", one "don't", two "no", one "yes"
        annotation(393225000, 393225, ["yes!", "yes", "Yes", "yes", "dont", "no", "no", "yes", "yes", "YES"], "Yes"),
        {"question_id": 71, "image_id": 7, "answers": "yes", "multiple_choice_answer": "yes"},  # [3] malformed
        annotation(999, 1, ["yes"] * 10, "yes"),  # no such question: ignored
    ],
}


def test_read_vqa(tmp_path):
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", QUESTIONS)
    annotations = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", ANNOTATIONS)
    problems = ProblemLog()
    items = read_vqa(questions, annotations, problems)
    assert items == [
        VqaQuestion(420, "COCO_val2014_000000000042", "How many dogs are there?",
                    ("2", "2", "2", "2", "3", "3", "2", "2", "3", "2"), "2"),
        VqaQuestion(421, "COCO_val2014_000000000042", "What is it?",
                    ("dog", "dog", "dog", "dogs", "dog", "puppy", "dog", "dog", "dog", "cat"), "dog"),
        VqaQuestion(393225000, "COCO_val2014_000000393225", "Is it sunny?",
                    ("yes", "yes", "yes", "yes", "don't", "no", "no", "yes", "yes", "yes"), "yes"),
    ]
    assert [where for where, _ in problems.items] == [
        f"{annotations}[3]", f"{questions}[3]", f"{questions}[4]", f"{questions}[5]"]
    assert problems.kinds() == {"malformed annotation": 1, "malformed question": 2, "missing annotation": 1}
    assert all("expected" in what or "has none" in what for _, what in problems.items)


def test_read_vqa_test_split(tmp_path):
    """Without annotations the answers are empty; test-dev2015's images are test2015's files."""
    questions = write_json(tmp_path / "q.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 262144, "question": "What is he doing?", "question_id": 262144000}]})
    problems = ProblemLog()
    assert read_vqa(questions, None, problems) == [
        VqaQuestion(262144000, "COCO_test2015_000000262144", "What is he doing?", (), "")]
    assert not problems.items


def test_read_vqa_file_errors(tmp_path):
    problems = ProblemLog()
    missing = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    with pytest.raises(VlmergeError, match="questions JSON") as e:
        read_vqa(missing, None, problems)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    questions = write_json(missing, QUESTIONS)
    with pytest.raises(VlmergeError, match="annotations JSON") as e:
        read_vqa(questions, tmp_path / "nope.json", problems)
    assert str(tmp_path / "nope.json") in str(e.value)
    no_subtype = write_json(tmp_path / "no_subtype.json", {"questions": []})
    with pytest.raises(VlmergeError, match="data_subtype"):
        read_vqa(no_subtype, None, problems)
    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(VlmergeError, match="not valid JSON") as e:
        read_vqa(tmp_path / "broken.json", None, problems)
    assert "\n" not in str(e.value)
    assert not problems.items


def q(major: str, answers: tuple[str, ...] = ()) -> VqaQuestion:
    return VqaQuestion(0, "COCO_train2014_000000000001", "?", answers, major)


def test_vqa_answer_vocab():
    # ViLT: major answers seen >= 9 times; here most frequent first, ties A-Z ("2" < "no")
    questions = [q("yes")] * 10 + [q("no")] * 9 + [q("2")] * 9 + [q("dog")] * 8 + [q("")] * 20
    assert vqa_answer_vocab(questions) == ("yes", "2", "no")
    assert vqa_answer_vocab(questions, min_count=8) == ("yes", "2", "no", "dog")
    assert vqa_answer_vocab(questions, min_count=11) == ()


def ref_vqa_accuracy(pred: str, humans: tuple[str, ...]) -> float:
    """vqaEval.py's rule, item by item: leave each human answer out, min(1, matches among the rest / 3), mean."""
    accs = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1:]
        matches = sum(1 for h in others if h == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def test_vqa_targets(tmp_path):
    vocab = ("yes", "2", "3", "dog", "cat", "dogs")
    # seven "2" -> 1, three "3" -> 0.9
    assert vqa_targets(("2", "2", "2", "2", "3", "3", "2", "2", "3", "2"), vocab) == {1: 1.0, 2: 0.9}
    # seven "dog" -> 1; "dogs", "cat" once -> 0.3; "puppy" is not in the vocabulary
    answers = ("dog", "dog", "dog", "dogs", "dog", "puppy", "dog", "dog", "dog", "cat")
    assert vqa_targets(answers, vocab) == {3: 1.0, 5: 0.3, 4: 0.3}
    assert vqa_targets(answers, {a: i for i, a in enumerate(vocab)}) == {3: 1.0, 5: 0.3, 4: 0.3}
    assert vqa_targets(("no", "no", "yes", "yes", "x", "x", "x", "x", "x", "x"), vocab) == {0: 0.6}
    assert vqa_targets((), vocab) == {}
    # with ten answers get_score is the official accuracy of the answer: 0, 0.3, 0.6, 0.9, then 1
    for n in range(11):
        humans = ("a",) * n + ("b",) * (10 - n)
        assert vqa_targets(humans, ("a",)).get(0, 0.0) == pytest.approx(ref_vqa_accuracy("a", humans))


def test_vqa_score():
    two = ("2", "2", "2", "2", "3", "3", "2", "2", "3", "2")
    dog = ("dog", "dog", "dog", "dogs", "dog", "puppy", "dog", "dog", "dog", "cat")
    yes = ("yes", "yes", "yes", "yes", "don't", "no", "no", "yes", "yes", "yes")
    # "Two" -> "2", seven matches: leaving any one out leaves >= 6, each min(1, .) = 1 -> 1
    assert vqa_score(["Two"], [two]) == 1.0
    # "three" -> "3", three matches: leaving a match out leaves 2 -> 2/3 (3 times), another leaves 3 -> 1 (7 times)
    #   (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_score(["three"], [two]) == pytest.approx(0.9)
    # "Dogs" -> "dogs", one match: leaving it out leaves 0 -> 0, another leaves 1 -> 1/3 (9 times): 0.3
    assert vqa_score(["Dogs"], [dog]) == pytest.approx(0.3)
    # "No." -> "no", two matches: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_score(["No."], [yes]) == pytest.approx(0.6)
    assert vqa_score(["dont"], [yes]) == pytest.approx(0.3)  # -> "don't"
    assert vqa_score(["maybe"], [yes]) == 0.0
    # the mean over questions
    assert vqa_score(["three", "Dogs", "No.", "maybe"], [two, dog, yes, yes]) == pytest.approx((0.9 + 0.3 + 0.6) / 4)
    with pytest.raises(ValueError):
        vqa_score(["yes"], [()])
    with pytest.raises(ValueError):
        vqa_score(["yes", "no"], [yes])


def test_vqa_score_against_reference():
    rng = random.Random(0)
    words = ["yes", "no", "2", "dog", "red"]
    preds, answers = [], []
    for _ in range(300):
        answers.append(tuple(rng.choice(words) for _ in range(rng.choice([1, 2, 3, 5, 9, 10, 10, 10]))))
        preds.append(rng.choice(words + ["cat"]))
    expected = sum(ref_vqa_accuracy(p, a) for p, a in zip(preds, answers)) / len(preds)
    assert vqa_score(preds, answers) == pytest.approx(expected)
    for p, a in zip(preds[:50], answers[:50]):
        assert vqa_score([p], [a]) == pytest.approx(ref_vqa_accuracy(p, a))


# ------------------------------------------------------------------------- Karpathy (COCO, Flickr30k)

def image(filename: str, split: str, captions: list[str], **extra) -> dict:
    sentences = [{"tokens": c.lower().split(), "raw": c, "imgid": 0, "sentid": i} for i, c in enumerate(captions)]
    return {"filepath": filename.split("_")[1] if "_" in filename else "", "filename": filename, "split": split,
            "imgid": 0, "sentids": list(range(len(captions))), "sentences": sentences, **extra}


def five(name: str) -> list[str]:
    return [f"A {name} caption number {i}. " if i % 2 else f"  {name} {i}\n" for i in range(5)]


KARPATHY = {"dataset": "coco", "images": [
    image("COCO_val2014_000000391895.jpg", "test", five("test"), cocoid=391895),
    image("COCO_val2014_000000522418.jpg", "restval", five("restval"), cocoid=522418),
    image("COCO_train2014_000000318556.jpg", "train", five("train"), cocoid=318556),
    image("COCO_val2014_000000184613.jpg", "val", five("val"), cocoid=184613),
    {"filename": "COCO_val2014_000000000001.jpg", "split": "test", "imgid": 4},  # [4] test, no sentences
    image("COCO_val2014_000000000002.jpg", "dev", five("dev")),  # [5] no such split
    {**image("COCO_train2014_000000000003.jpg", "train", five("x")), "sentences": [{"tokens": ["x"]}]},  # [6] no raw
]}


def stripped(name: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in five(name))


def test_read_karpathy(tmp_path):
    path = write_json(tmp_path / "dataset_coco.json", KARPATHY)
    runs = {}
    for split in ("train", "val", "test", "restval"):
        problems = ProblemLog()
        runs[split] = read_karpathy(path, split, problems), [where for where, _ in problems.items]
    # restval is trained on (Karpathy's convention); a row's problems show when its split is read,
    # a row whose split is unknown each time
    assert runs["train"] == ([RetrievalImage("COCO_val2014_000000522418", stripped("restval")),
                              RetrievalImage("COCO_train2014_000000318556", stripped("train"))],
                             [f"{path}[5]", f"{path}[6]"])
    assert runs["val"] == ([RetrievalImage("COCO_val2014_000000184613", stripped("val"))], [f"{path}[5]"])
    assert runs["test"] == ([RetrievalImage("COCO_val2014_000000391895", stripped("test"))],
                            [f"{path}[4]", f"{path}[5]"])
    assert runs["restval"][0] == [RetrievalImage("COCO_val2014_000000522418", stripped("restval"))]
    assert runs["test"][0][0].captions == ("test 0", "A test caption number 1.", "test 2",
                                           "A test caption number 3.", "test 4")
    problems = ProblemLog()
    read_karpathy(path, "train", problems)
    assert all(what.startswith("malformed image: expected") for _, what in problems.items)


def test_read_karpathy_flickr_and_errors(tmp_path):
    path = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        image("1000092795.jpg", "test", five("flickr")), image("10002456.jpg", "train", five("other"))]})
    problems = ProblemLog()
    assert read_karpathy(path, "test", problems) == [RetrievalImage("1000092795", stripped("flickr"))]
    assert not problems.items
    with pytest.raises(VlmergeError, match="Karpathy split JSON") as e:
        read_karpathy(tmp_path / "dataset_coco.json", "test", problems)
    assert str(tmp_path / "dataset_coco.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VlmergeError, match="'testing'"):
        read_karpathy(path, "testing", problems)
    with pytest.raises(VlmergeError, match="'images' list"):
        read_karpathy(write_json(tmp_path / "list.json", [1, 2]), "test", problems)


# ----------------------------------------------------------------------------------------------- NLVR²

NLVR2_LINES = [
    json.dumps({"validation": {"0": "True"}, "sentence": "The left image contains twice the number of dogs.",
                "left_url": "http://example.org/l.jpg", "writer": "103", "label": "True", "right_url": "http://r",
                "synset": "dog", "query": "dogs", "identifier": "dev-850-0-0", "extra_validations": {}}),
    json.dumps({"sentence": " One image shows exactly two dogs. ", "label": "False", "identifier": "dev-850-0-1"}),
    '{"identifier": "dev-851-1-0", "sentence": "cut off',  # 3: not JSON
    json.dumps({"sentence": "Two birds.", "label": "yes", "identifier": "dev-852-2-0"}),  # 4: bad label
    "",  # 5: blank, skipped
    json.dumps({"sentence": "A cat.", "label": "True", "identifier": "dev852"}),  # 6: bad identifier
    json.dumps({"sentence": "Dogs.", "label": "False", "identifier": "train-10171-0-0", "directory": "7"}),
    json.dumps({"label": "True", "identifier": "test1-0-1-3"}),  # 8: no sentence
]


def test_read_nlvr2(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text("\n".join(NLVR2_LINES) + "\n")
    problems = ProblemLog()
    assert read_nlvr2(path, problems) == [
        Nlvr2Item("dev-850-0-0", "The left image contains twice the number of dogs.",
                  ("dev-850-0-img0", "dev-850-0-img1"), True),
        Nlvr2Item("dev-850-0-1", "One image shows exactly two dogs.", ("dev-850-0-img0", "dev-850-0-img1"), False),
        Nlvr2Item("train-10171-0-0", "Dogs.", ("train-10171-0-img0", "train-10171-0-img1"), False),
    ]
    assert [where for where, _ in problems.items] == [f"{path}:3", f"{path}:4", f"{path}:6", f"{path}:8"]
    assert problems.kinds() == {"malformed line": 1, "malformed label": 1, "malformed item": 2}
    assert 'expected "True" or "False", got \'yes\'' in problems.items[1][1]
    with pytest.raises(VlmergeError, match="NLVR² JSON-lines file") as e:
        read_nlvr2(tmp_path / "test1.json", problems)
    assert str(tmp_path / "test1.json") in str(e.value)


# ------------------------------------------------------------------------------------------- retrieval

def ref_recalls(scores: np.ndarray, caption_image: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """One query at a time: candidates in a stable sort by descending score (ties: earlier index first)."""
    n_images, n_captions = len(scores), len(scores[0])
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_images):
            order = sorted(range(n_captions), key=lambda c: -scores[i][c])
            hits += any(caption_image[c] == i for c in order[:k])
        out[f"tr_r{k}"] = hits / n_images
    for k in ks:
        hits = 0
        for c in range(n_captions):
            order = sorted(range(n_images), key=lambda i: -scores[i][c])
            hits += caption_image[c] in order[:k]
        out[f"ir_r{k}"] = hits / n_captions
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def test_retrieval_recalls_by_hand():
    caption_image = np.array([0, 0, 1, 1, 2])
    scores = np.array([
        [0.9, 0.1, 0.9, 0.2, 0.0],  # image 0: c0 ties c2 and comes first -> c0 (its own) at 0
        [0.5, 0.5, 0.5, 0.5, 0.5],  # image 1: all tied -> c0 c1 c2 ...: its c2 at 2
        [0.3, 0.8, 0.1, 0.8, 0.5],  # image 2: c1 c3 c4 ...: its c4 at 2
    ])
    # text retrieval places 0, 2, 2 -> R@1 1/3, R@2 1/3, R@5 1
    # image retrieval, each caption's column: c0 [.9 .5 .3] image 0 at 0; c1 [.1 .5 .8] image 0 at 2;
    #   c2 [.9 .5 .1] image 1 at 1; c3 [.2 .5 .8] image 1 at 1; c4 [0 .5 .5] image 2 ties image 1, after it: 1
    #   -> R@1 1/5, R@2 4/5, R@5 1
    expected = {"tr_r1": 1 / 3, "tr_r2": 1 / 3, "tr_r5": 1.0, "ir_r1": 0.2, "ir_r2": 0.8, "ir_r5": 1.0,
                "r_mean": (1 / 3 + 1 / 3 + 1 + 0.2 + 0.8 + 1) / 6}  # = 11/18
    got = retrieval_recalls(scores, caption_image, ks=(1, 2, 5))
    assert got == pytest.approx(expected) and list(got) == list(expected)
    assert got["r_mean"] == pytest.approx(11 / 18)
    assert got == pytest.approx(ref_recalls(scores.tolist(), caption_image.tolist(), (1, 2, 5)))
    assert list(retrieval_recalls(scores, caption_image)) == ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10",
                                                             "r_mean"]


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_recalls_against_reference(seed):
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(3, 15))
    caption_image = rng.integers(0, n_images, size=int(rng.integers(n_images, 4 * n_images)))  # some may have none
    scores = rng.integers(0, 4, size=(n_images, len(caption_image))).astype(np.float32)  # many ties
    if seed % 2:
        scores = rng.normal(size=scores.shape)
    ks = (1, 2, 5, 10)
    assert retrieval_recalls(scores, caption_image, ks) == pytest.approx(
        ref_recalls(scores.tolist(), caption_image.tolist(), ks))


def test_retrieval_recalls_checks():
    with pytest.raises(ValueError):
        retrieval_recalls(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError):
        retrieval_recalls(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        retrieval_recalls(np.array([[0.0, np.nan]]), np.array([0, 0]))
    # an image without captions is a text-retrieval miss whatever k
    assert retrieval_recalls(np.ones((2, 2)), np.array([0, 0]), ks=(10,))["tr_r10"] == 0.5
