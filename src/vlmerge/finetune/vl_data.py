"""Readers of the downstream vision-language sets Sung et al. (EMNLP 2023) fine-tune on, in their
official release layouts: VQAv2, the Karpathy splits of COCO and Flickr30k, and NLVR².

Image ids are the stems of the official image files, the ids our feature store keys images by:
- VQAv2: `COCO_<data_subtype>_<12-digit image_id>` (the release's file names, as the VQA API's
  vqaDemo.py builds them), the subtype read from the questions file; test-dev2015's images are
  test2015's files, so "test-dev2015" becomes "test2015".
- Karpathy: the `filename` without its extension ("COCO_val2014_000000391895", Flickr's "1000092795").
- NLVR²: `<split>-<set>-<pair>-img0` / `-img1`, the identifier `<split>-<set>-<pair>-<sentence>`
  less its sentence part (the release's image names; train images sit in numbered `directory`
  folders, but the stem is the same).

VQA answers are normalised as the official evaluation does (github.com/GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00, 2021 "Fixed processing answers bug":
`processPunctuation` then `processDigitArticle`; their tables are reproduced below). The official
script normalises the human answers, and the prediction, only when the ten answers differ; we
normalise them always, which changes nothing for the release's answers (already in that form).

The answer vocabulary and soft targets are ViLT's (github.com/dandelin/ViLT vilt/utils/write_vqa.py),
which VLMo and Sung et al. follow: the normalised `multiple_choice_answer`s counted over train+val,
kept when seen at least 9 times (3,129 answers), and per question each kept answer scored by how
many of the ten human answers it is, `get_score`: 0, 0.3, 0.6, 0.9, then 1 from four on, which is
exactly the official leave-one-out accuracy of that answer among ten. (ViLT counts the raw human
answers against the normalised vocabulary; we count the normalised ones.)

Malformed records are per-item problems (file:line for JSON lines, file[index] for a JSON array),
never fatal; a missing or unreadable file is a `VlmergeError` naming it and what was expected.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from vlmerge.errors import VlmergeError
from vlmerge.problems import ProblemLog, read_jsonl

# vqaEval.py's tables. Its keys with capitals ("Im", "Ive", ...) never match (words are lower-cased
# first) and "somebody'd" maps backwards: kept as they are, since they are the metric's definition.
_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas",
    'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't",
    'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll",
    'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've",}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern, whose "(?!<=\d)" is a look-ahead that always holds: a period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def normalize_answer(text: str) -> str:
    """A VQA answer as vqaEval.py compares it: processPunctuation, then processDigitArticle."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # A mark beside a space, or any mark in a text with a digit,digit comma, is dropped; otherwise it splits words.
    has_number_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCT:
        dropped = has_number_comma or p + " " in text or " " + p in text
        out = out.replace(p, "" if dropped else " ")
    out = _PERIOD_STRIP.sub("", out)  # (vqaEval passes re.UNICODE as sub's count, 32: no answer has that many)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _load_json(path: Path, what: str, key: str) -> tuple[dict, list]:
    """The object in a JSON file and its `key` list; a missing or unreadable file stops here."""
    if not path.is_file():
        raise VlmergeError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlmergeError(f"{path}: not valid JSON ({e}), expected {what}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VlmergeError(f"{path}: expected {what}: an object with a {key!r} list")
    return data, data[key]


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------------------------------------- VQAv2

@dataclasses.dataclass(frozen=True)
class VqaQuestion:
    question_id: int
    image_id: str  # COCO_<subtype>_<12-digit id>: the image file's stem
    question: str
    answers: tuple[str, ...] = ()  # the (ten) human answers, normalised; () without annotations (test)
    major_answer: str = ""  # `multiple_choice_answer` (the most common human answer), normalised; "" for test


def _read_vqa_annotations(path: Path, problems: ProblemLog) -> dict[int, tuple[tuple[str, ...], str]]:
    _, rows = _load_json(path, "the VQAv2 annotations JSON (v2_mscoco_<subtype>_annotations.json)", "annotations")
    out: dict[int, tuple[tuple[str, ...], str]] = {}
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        answers = row.get("answers") if isinstance(row, dict) else None
        if not (isinstance(row, dict) and _is_id(row.get("question_id"))
                and isinstance(row.get("multiple_choice_answer"), str) and isinstance(answers, list) and answers
                and all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers)):
            problems.add(where, "malformed annotation: expected an integer 'question_id', a string "
                                "'multiple_choice_answer' and a non-empty 'answers' list of {'answer': string}")
            continue
        if row["question_id"] in out:
            problems.add(where, f"malformed annotation: expected one per question, question_id "
                                f"{row['question_id']} has another")
            continue
        out[row["question_id"]] = (tuple(normalize_answer(a["answer"]) for a in answers),
                                   normalize_answer(row["multiple_choice_answer"]))
    return out


def read_vqa(questions_json: Path, annotations_json: Path | None, problems: ProblemLog) -> list[VqaQuestion]:
    """The questions of a VQAv2 split, with their normalised answers when an annotations file is given."""
    data, rows = _load_json(questions_json, "the VQAv2 questions JSON (v2_OpenEnded_mscoco_<subtype>_questions.json)",
                            "questions")
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise VlmergeError(f"{questions_json}: expected a 'data_subtype' (e.g. \"val2014\"): the image ids need it")
    image_set = "test2015" if subtype == "test-dev2015" else subtype
    annotations = _read_vqa_annotations(annotations_json, problems) if annotations_json is not None else None
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{questions_json}[{i}]"
        if not (isinstance(row, dict) and _is_id(row.get("question_id")) and _is_id(row.get("image_id"))
                and isinstance(row.get("question"), str)):
            problems.add(where, "malformed question: expected integer 'question_id' and 'image_id' and a string "
                                "'question'")
            continue
        qid = row["question_id"]
        if qid in seen:
            problems.add(where, f"malformed question: expected unique question ids, {qid} repeats")
            continue
        seen.add(qid)
        answers, major = (), ""
        if annotations is not None:
            if qid not in annotations:
                problems.add(where, f"missing annotation: question_id {qid} has none in {annotations_json}")
                continue
            answers, major = annotations[qid]
        out.append(VqaQuestion(qid, f"COCO_{image_set}_{row['image_id']:012d}", row["question"].strip(), answers,
                               major))
    return out


def vqa_answer_vocab(questions: Sequence[VqaQuestion], min_count: int = 9) -> tuple[str, ...]:
    """ViLT's answer set: the major answers seen at least `min_count` times, most frequent first, then A–Z."""
    counts = collections.Counter(q.major_answer for q in questions if q.major_answer)
    return tuple(sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a)))


_SOFT_SCORE = (0.0, 0.3, 0.6, 0.9, 1.0)  # ViLT's get_score by the number of human answers, capped at 4


def vqa_targets(answers: Sequence[str], vocab: Sequence[str] | Mapping[str, int]) -> dict[int, float]:
    """The soft target of each vocabulary answer among `answers` (vocab index -> score); pass a dict for speed."""
    index = vocab if isinstance(vocab, Mapping) else {a: i for i, a in enumerate(vocab)}
    counts = collections.Counter(answers)
    return {index[a]: _SOFT_SCORE[min(n, 4)] for a, n in counts.items() if a in index}


# ------------------------------------------------------------------------- Karpathy (COCO, Flickr30k)

@dataclasses.dataclass(frozen=True)
class RetrievalImage:
    image_id: str  # the file name's stem
    captions: tuple[str, ...]  # the raw sentences, stripped


KARPATHY_SPLITS = ("train", "val", "test", "restval")


def read_karpathy(path: Path, split: str, problems: ProblemLog) -> list[RetrievalImage]:
    """The images of one split of dataset_coco.json / dataset_flickr30k.json; "train" includes "restval"."""
    if split not in KARPATHY_SPLITS:
        raise VlmergeError(f"Karpathy split {split!r}: expected one of {', '.join(KARPATHY_SPLITS)}")
    # Karpathy's convention (and ViLT's, ALBEF's): COCO's 30,504 restval images are trained on.
    wanted = {"train", "restval"} if split == "train" else {split}
    _, rows = _load_json(path, "a Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json)", "images")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        if not isinstance(row, dict) or row.get("split") not in KARPATHY_SPLITS:
            problems.add(where, f"malformed image: expected a 'split' of {', '.join(KARPATHY_SPLITS)}")
            continue
        if row["split"] not in wanted:  # other splits' rows are checked when those splits are read
            continue
        sentences = row.get("sentences")
        if not (isinstance(row.get("filename"), str) and row["filename"].strip() and isinstance(sentences, list)
                and sentences and all(isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()
                                      for s in sentences)):
            problems.add(where, "malformed image: expected a string 'filename' and a non-empty 'sentences' list "
                                "of {'raw': non-empty string}")
            continue
        out.append(RetrievalImage(PurePosixPath(row["filename"].strip()).stem,
                                  tuple(s["raw"].strip() for s in sentences)))
    return out


# ----------------------------------------------------------------------------------------------- NLVR²

@dataclasses.dataclass(frozen=True)
class Nlvr2Item:
    identifier: str  # <split>-<set>-<pair>-<sentence>, e.g. "dev-850-0-0"
    sentence: str
    images: tuple[str, str]  # the left and right image: <split>-<set>-<pair>-img0, -img1
    label: bool


_NLVR2_ID = re.compile(r"[^-\s]+-\d+-\d+-\d+")


def read_nlvr2(path: Path, problems: ProblemLog) -> list[Nlvr2Item]:
    """The items of an NLVR² JSON-lines file (nlvr2/data/train.json, dev.json, test1.json)."""
    out = []
    for where, row in read_jsonl(path, problems, "the NLVR² JSON-lines file (e.g. nlvr2/data/dev.json)"):
        identifier, sentence, label = row.get("identifier"), row.get("sentence"), row.get("label")
        if not (isinstance(identifier, str) and _NLVR2_ID.fullmatch(identifier) and isinstance(sentence, str)):
            problems.add(where, "malformed item: expected an 'identifier' <split>-<set>-<pair>-<sentence> "
                                "and a string 'sentence'")
            continue
        if label not in ("True", "False"):
            problems.add(where, f'malformed label: expected "True" or "False", got {label!r}')
            continue
        pair = identifier.rsplit("-", 1)[0]
        out.append(Nlvr2Item(identifier, sentence.strip(), (f"{pair}-img0", f"{pair}-img1"), label == "True"))
    return out
