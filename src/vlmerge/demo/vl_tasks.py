"""Demo-world versions of three downstream vision-language fine-tuning sets, in their real formats.

Sung et al. (EMNLP 2023) fine-tune merged models on VQA, image–text retrieval and NLVR²; these are
the demo world's versions, written in the files and fields of the real releases so that the same
readers read both. Every image is a rendered 64×64 scene (PNG, where the real releases have JPG);
each answer or match rests on what a pooled image vector carries (colour, size, and count where
the size is fixed), and the text alone is at chance:

- VQA (VQAv2 format), `eval/vl/vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json` and
  `eval/vl/vqa/v2_mscoco_{train,val}2014_annotations.json`, about one-group scenes, two questions
  per image: a colour question ("what colour are the stars ?", answer_type "other") and either a
  count question ("how many stars are there ?", "number", answers "1"–"4") or a size question
  ("is the star big ?", "yes/no"). Within each question type the answers are uniform (colour 1/8,
  count 1/4, yes/no 1/2, and the adjective asked is independent of the answer), so a model without
  the image is at chance; overall no answer is more than 1/8 of the questions. Ten human answers
  per question: the right one at least seven times, the others a plausible slip (another colour,
  a count off by one, the other yes/no), so VQA's soft score (min(1, n/3)) matters.
- Retrieval (Karpathy's split format), `eval/vl/retrieval/dataset_demo.json`: scenes of the
  pre-training kind (one group or two in a relation), each with 5 distinct captions in different
  caption styles; no two images of a split share their groups' colours, sizes and counts while
  such scenes are left to draw, so colour and size separate most of them. Text alone ranks at chance
  (R@1 = 1/number of test images).
- NLVR² (its JSONL `{train,dev}.json`): statements about two one-group images (left = img0,
  right = img1) that compare them ("the left image has more red stars than the right image .",
  "both images contain at least one blue circle .", "exactly one image contains a big star ."):
  each statement (a "set") comes with two image pairs, one that makes it True and one that makes
  it False, so every sentence is True exactly half the time and text alone is at chance. What
  decides the label is a colour, a size, or a count among shapes of one size (an area).

Images: VQA's and retrieval's under `eval/vl/coco/{train2014,val2014}/COCO_<subtype>_<12-digit
id>.png` (as the COCO release names them; the two sets' ids are disjoint), NLVR²'s under
`eval/vl/nlvr2/images/train/<directory>/` and `images/dev/` as the NLVR² release lays them out. All
are listed in `eval/images.jsonl` (image_id = the file stem) for precompute.

Sizes are those at the default world's 7,500 training images (REFERENCE_IMAGES), scaled with
`n_images` and at least MIN_PER_SPLIT images (VQA, retrieval) or sets (NLVR²) per split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vlmerge.demo.grammar import COLOURS, SHAPES, add_s, with_articles
from vlmerge.demo.images import CaptionStyle, Group, Scene, caption, group_colour_question, random_scene, random_style, render
from vlmerge.io import write_text

VL = "eval/vl"
EVAL_IMAGES = "eval/images.jsonl"
COCO = f"{VL}/coco"
VQA = f"{VL}/vqa"
RETRIEVAL = f"{VL}/retrieval/dataset_demo.json"
NLVR2 = f"{VL}/nlvr2"

REFERENCE_IMAGES = 7500  # DemoConfig's default n_images: the sizes below are those at it
VQA_IMAGES = {"train": 400, "val": 100}  # two questions each: 800 / 200 questions
RETRIEVAL_IMAGES = {"train": 300, "val": 50, "test": 100}
NLVR2_SETS = {"train": 300, "dev": 100}  # two items each (a True and a False pair): 600 / 200 items
MIN_PER_SPLIT = 4
CAPTIONS_PER_IMAGE = 5
HUMAN_ANSWERS = 10
WRONG_ANSWERS = (0, 1, 1, 2, 2, 3)  # how many of the 10 human answers are a slip: drawn uniformly
SIGNATURE_TRIES = 50  # draws per retrieval image before two images of a split may share a signature
VQA_IDS = range(1, 300_000)  # COCO-style integer image ids; retrieval draws from the range above
RETRIEVAL_IDS = range(300_000, 600_000)
SUBTYPES = {"train": "train2014", "val": "val2014", "test": "val2014"}  # Karpathy's splits come from both
SIZES = ("small", "big")
COUNTS = (1, 2, 3, 4)
CANONICAL = CaptionStyle("", "", "and", True, False)  # the manifest's caption, as the demo VQA's
NLVR2_TEMPLATES = ("both", "exactly_one", "more", "bigger", "same_colour")

RenderRng = Callable[[str], random.Random]  # image id -> its own rendering stream


def scaled(sizes: dict[str, int], n_images: int) -> dict[str, int]:
    """`sizes` at REFERENCE_IMAGES training images, scaled to `n_images`, at least MIN_PER_SPLIT each."""
    return {split: max(MIN_PER_SPLIT, round(n * n_images / REFERENCE_IMAGES)) for split, n in sizes.items()}


def balanced(values: Sequence, n: int, rng: random.Random) -> list:
    """`n` values, each of `values` equally often (±1), in random order."""
    out = [values[k % len(values)] for k in range(n)]
    rng.shuffle(out)
    return out


def coco_stem(subtype: str, image_id: int) -> str:
    return f"COCO_{subtype}_{image_id:012d}"


def _other(values: Sequence, value) -> list:
    return [v for v in values if v != value]


# VQA
@dataclass(frozen=True)
class VqaQuestion:
    question: str
    answer: str
    answer_type: str  # VQAv2's: "other", "number", "yes/no"
    question_type: str  # VQAv2's: the question's first words
    slips: tuple[str, ...]  # the wrong answers a human might give


def vqa_questions(group: Group, second: str, asked: str | None = None) -> list[VqaQuestion]:
    """The colour question and a "count" or "size" question (`asked`: the adjective) about a one-group scene."""
    plural = group.count > 1
    be = "are" if plural else "is"
    noun = add_s(group.shape) if plural else group.shape
    out = [VqaQuestion(" ".join(group_colour_question(group)), group.colour, "other", f"what colour {be} the",
                       tuple(_other(COLOURS, group.colour)))]
    if second == "count":
        slips = tuple(str(c) for c in (group.count - 1, group.count + 1) if c in COUNTS)
        out.append(VqaQuestion(f"how many {add_s(group.shape)} are there ?", str(group.count), "number", "how many", slips))
    else:
        answer = "yes" if group.size == asked else "no"
        out.append(VqaQuestion(f"{be} the {noun} {asked} ?", answer, "yes/no", f"{be} the",
                               ("no" if answer == "yes" else "yes",)))
    return out


def vqa_split(n_images: int, subtype: str, image_ids: Sequence[int], rng: random.Random
              ) -> tuple[dict[str, Scene], list[dict], list[dict]]:
    """Scenes by file stem, VQAv2 question rows and annotation rows for one split."""
    colours = balanced(COLOURS, n_images, rng)
    seconds = balanced(("count", "size"), n_images, rng)
    counts = iter(balanced(COUNTS, seconds.count("count"), rng))
    size_items = iter(balanced([(asked, yes) for asked in SIZES for yes in (True, False)], seconds.count("size"), rng))
    scenes, questions, annotations = {}, [], []
    for k, image_id in enumerate(image_ids[:n_images]):
        shape = rng.choice(SHAPES)
        asked = None
        if seconds[k] == "count":
            count, size = next(counts), rng.choice(SIZES)
        else:
            asked, yes = next(size_items)
            size, count = asked if yes else _other(SIZES, asked)[0], rng.choice(COUNTS)
        group = Group(count, size, colours[k], shape)
        scenes[coco_stem(subtype, image_id)] = Scene((group,))
        for j, q in enumerate(vqa_questions(group, seconds[k], asked)):
            question_id = image_id * 1000 + j  # as VQAv2 numbers them
            questions.append({"image_id": image_id, "question": q.question, "question_id": question_id})
            annotations.append({
                "question_type": q.question_type,
                "multiple_choice_answer": q.answer,
                "answers": human_answers(q.answer, q.slips, rng),
                "image_id": image_id,
                "answer_type": q.answer_type,
                "question_id": question_id,
            })
    return scenes, questions, annotations


def human_answers(right: str, slips: Sequence[str], rng: random.Random) -> list[dict]:
    """Ten annotators' answers: the right one at least 7 times, the rest slips."""
    wrong = rng.choice(WRONG_ANSWERS)
    answers = [right] * (HUMAN_ANSWERS - wrong) + [rng.choice(slips) for _ in range(wrong)]
    rng.shuffle(answers)
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(answers, 1)]


# Retrieval
def signature(scene: Scene) -> tuple:
    """What a pooled vector reads well of a scene: its groups' colours, sizes and counts."""
    return tuple(sorted((g.colour, g.size, g.count) for g in scene.groups))


def distinct_captions(scene: Scene, n: int, rng: random.Random) -> list[str]:
    """`n` different captions of the scene, each in a random caption style."""
    out: list[str] = []
    while len(out) < n:
        text = caption(scene, random_style(rng))
        if text not in out:
            out.append(text)
    return out


def retrieval_scenes(sizes: dict[str, int], rng: random.Random) -> list[tuple[str, Scene, list[str]]]:
    """(split, scene, captions) for every image: all scenes distinct, signatures distinct within a split while possible."""
    out, seen = [], set()
    for split, n in sizes.items():
        signatures: set[tuple] = set()
        for _ in range(n):
            for attempt in range(SIGNATURE_TRIES * 20):
                scene = random_scene(rng)
                if scene not in seen and (signature(scene) not in signatures or attempt >= SIGNATURE_TRIES):
                    break
            else:
                raise RuntimeError(f"retrieval: no new scene after {SIGNATURE_TRIES * 20} draws")
            seen.add(scene)
            signatures.add(signature(scene))
            out.append((split, scene, distinct_captions(scene, CAPTIONS_PER_IMAGE, rng)))
    return out


def karpathy_dataset(images: list[tuple[str, int, list[str]]]) -> dict:
    """Karpathy's dataset_*.json from (split, COCO id, captions)."""
    rows, sentid = [], 0
    for imgid, (split, coco_id, captions) in enumerate(images):
        subtype = SUBTYPES[split]
        sentences = [{"tokens": text.split(), "raw": text, "imgid": imgid, "sentid": sentid + k}
                     for k, text in enumerate(captions)]
        rows.append({
            "filepath": subtype,
            "sentids": [s["sentid"] for s in sentences],
            "filename": f"{coco_stem(subtype, coco_id)}.png",
            "imgid": imgid,
            "split": split,
            "sentences": sentences,
            "cocoid": coco_id,
        })
        sentid += len(sentences)
    return {"images": rows, "dataset": "demo"}


# NLVR²
Pair = tuple[Scene, Scene]


def nlvr2_set(template: str, rng: random.Random) -> tuple[str, Pair, Pair]:
    """A statement about two images (left, right) and a pair that makes it True, then one that makes it False."""
    shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    plural = add_s(shape)

    def group(**fixed) -> Group:
        return replace(Group(rng.choice(COUNTS), rng.choice(SIZES), colour, shape), **fixed)

    def pair(left: Group, right: Group) -> Pair:
        return Scene((left,)), Scene((right,))

    if template == "both":
        sentence = f"both images contain at least one {colour} {shape} ."
        other = rng.choice(_other(COLOURS, colour))
        true = pair(group(), group())
        false = pair(group(), group(colour=other)) if rng.random() < 0.5 else pair(group(colour=other), group())
    elif template == "exactly_one":
        asked = rng.choice(SIZES)
        sentence = f"exactly one image contains a {asked} {shape} ."
        other = _other(SIZES, asked)[0]
        left, right = (asked, other) if rng.random() < 0.5 else (other, asked)
        same = rng.choice(SIZES)
        true, false = pair(group(size=left), group(size=right)), pair(group(size=same), group(size=same))
    elif template == "more":
        word = rng.choice(("more", "fewer"))
        sentence = f"the left image has {word} {colour} {plural} than the right image ."
        low, high = sorted(rng.sample(COUNTS, 2))
        size = rng.choice(SIZES)  # one size: the count is then the shapes' area
        first, second = (high, low) if word == "more" else (low, high)
        true = pair(group(count=first, size=size), group(count=second, size=size))
        false = pair(group(count=second, size=size), group(count=first, size=size))
    elif template == "bigger":
        word = rng.choice(("bigger", "smaller"))
        sentence = f"the left image has {word} {plural} than the right image ."
        count = rng.choice(COUNTS)
        first, second = ("big", "small") if word == "bigger" else ("small", "big")
        true = pair(group(count=count, size=first), group(count=count, size=second))
        false = pair(group(count=count, size=second), group(count=count, size=first))
    elif template == "same_colour":
        sentence = f"the {plural} in both images are the same colour ."
        true = pair(group(), group())
        false = pair(group(), group(colour=rng.choice(_other(COLOURS, colour))))
    else:
        raise ValueError(f"unknown NLVR2 template {template!r}; known: {', '.join(NLVR2_TEMPLATES)}")
    return " ".join(with_articles(sentence.split())), true, false


def nlvr2_split(split: str, n_sets: int, rng: random.Random) -> tuple[list[dict], dict[str, tuple[str, Scene]]]:
    """NLVR² rows of one split and its images: stem -> (path under the nlvr2 folder, scene)."""
    rows, images = [], {}
    for set_id, template in enumerate(balanced(NLVR2_TEMPLATES, n_sets, rng)):
        sentence, true, false = nlvr2_set(template, rng)
        pairs = [(true, "True"), (false, "False")]
        if rng.random() < 0.5:
            pairs.reverse()
        folder = f"images/train/{set_id % 100}" if split == "train" else f"images/{split}"
        for pair_id, (scenes, label) in enumerate(pairs):
            row = {"identifier": f"{split}-{set_id}-{pair_id}-0", "sentence": sentence, "label": label}
            if split == "train":
                row["directory"] = set_id % 100
            rows.append(row)
            for k, scene in enumerate(scenes):
                stem = f"{split}-{set_id}-{pair_id}-img{k}"
                images[stem] = (f"{folder}/{stem}.png", scene)
    return rows, images


# Writing
def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False))  # compact, as the real releases


def write_vl_tasks(root: Path, n_images: int, *, vqa_rng: random.Random, retrieval_rng: random.Random,
                   nlvr2_rng: random.Random, render_rng: RenderRng) -> dict:
    """Write the three sets and their images under the world's `root`, append the images to
    eval/images.jsonl (image_id = file stem, path relative to eval/); the counts."""
    images: dict[str, tuple[str, Scene]] = {}  # stem -> (path relative to eval/, scene)
    counts: dict = {}

    vqa_sizes = scaled(VQA_IMAGES, n_images)
    vqa_ids = vqa_rng.sample(VQA_IDS, sum(vqa_sizes.values()))
    counts["vqa_questions"], counts["vqa_images"] = {}, {}
    start = 0
    for split, n in vqa_sizes.items():
        subtype = SUBTYPES[split]
        scenes, questions, annotations = vqa_split(n, subtype, vqa_ids[start:start + n], vqa_rng)
        start += n
        images |= {stem: (f"vl/coco/{subtype}/{stem}.png", scene) for stem, scene in scenes.items()}
        common = {"info": {"description": "vlmerge demo world: VQAv2-format questions about rendered shape scenes"},
                  "data_type": "mscoco", "data_subtype": subtype}
        _write_json(root / VQA / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                    {**common, "task_type": "Open-Ended", "questions": questions})
        _write_json(root / VQA / f"v2_mscoco_{subtype}_annotations.json", {**common, "annotations": annotations})
        counts["vqa_questions"][split], counts["vqa_images"][split] = len(questions), len(scenes)

    retrieval_sizes = scaled(RETRIEVAL_IMAGES, n_images)
    drawn = retrieval_scenes(retrieval_sizes, retrieval_rng)
    coco_ids = retrieval_rng.sample(RETRIEVAL_IDS, len(drawn))
    for (split, scene, _), coco_id in zip(drawn, coco_ids):
        stem = coco_stem(SUBTYPES[split], coco_id)
        images[stem] = (f"vl/coco/{SUBTYPES[split]}/{stem}.png", scene)
    _write_json(root / RETRIEVAL, karpathy_dataset([(split, i, texts) for (split, _, texts), i in zip(drawn, coco_ids)]))
    counts["retrieval_images"] = retrieval_sizes

    counts["nlvr2_items"] = {}
    for split, n_sets in scaled(NLVR2_SETS, n_images).items():
        rows, split_images = nlvr2_split(split, n_sets, nlvr2_rng)
        write_text(root / NLVR2 / f"{split}.json", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        images |= {stem: (f"vl/nlvr2/{rel}", scene) for stem, (rel, scene) in split_images.items()}
        counts["nlvr2_items"][split] = len(rows)

    manifest = root / EVAL_IMAGES
    lines = []
    for stem, (rel, scene) in images.items():
        path = manifest.parent / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        render(scene, render_rng(stem)).save(path, format="PNG")
        lines.append(json.dumps({"image_id": stem, "path": rel, "caption": caption(scene, CANONICAL)}, ensure_ascii=False))
    write_text(manifest, manifest.read_text(encoding="utf-8") + "".join(line + "\n" for line in lines))
    counts["images"] = len(images)
    return counts
