"""The demo world: what the pipeline and its users rely on."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmerge.demo import DemoWorld, generate
from vlmerge.demo.grammar import COLOURS, add_s, with_articles
from vlmerge.demo.images import BACKGROUND, RADII, RGB, Scene, random_group, render

SMALL = {"text_words": 2000, "n_images": 8, "n_winoground": 4, "pairs_per_phenomenon": 5}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(demo_world: DemoWorld) -> DemoWorld:
    """The session's default world (tests/conftest.py), generated once for every test file."""
    return demo_world


@pytest.fixture(scope="module")
def meta(world: DemoWorld) -> dict:
    return json.loads((world.root / "world.json").read_text(encoding="utf-8"))


def test_corpus_is_large_enough(world: DemoWorld) -> None:
    train = world.text_train.read_text(encoding="utf-8").splitlines()
    dev = world.text_dev.read_text(encoding="utf-8").splitlines()
    assert sum(len(line.split()) for line in train) == world.words >= 80_000
    assert 0.03 * world.words < sum(len(line.split()) for line in dev) < 0.1 * world.words
    assert not set(dev) & set(train)
    assert all(line.endswith((" .", " ?")) for line in train + dev)


def test_held_out_words_never_seen_in_training(world: DemoWorld, meta: dict) -> None:
    held_out = set(meta["lexicon"]["held_out_words"])
    assert {noun for pair in meta["lexicon"]["held_out"]["nouns"] for noun in pair} <= held_out
    assert meta["lexicon"]["held_out"]["verbs"] and meta["lexicon"]["held_out"]["adjectives"]
    training_words = set(world.text_train.read_text(encoding="utf-8").split())
    training_words |= {w for row in read_jsonl(world.captions) for w in row["caption"].split()}
    assert not held_out & training_words


def test_images_have_captions_in_a_caption_register(world: DemoWorld) -> None:
    rows = read_jsonl(world.captions)
    assert len(rows) == world.images >= 2000
    assert len({row["image_id"] for row in rows}) == len(rows)
    for row in rows[:300]:
        with Image.open(world.captions.parent / row["path"]) as image:
            assert (image.size, image.mode) == ((64, 64), "RGB")
    on_disk = {p.stem for p in world.images_dir.glob("img-*.png")}
    assert on_disk == {row["image_id"] for row in rows}
    talk = [row for row in rows if row["caption"].startswith("what colour ")]
    captions = [row for row in rows if not row["caption"].startswith("what colour ")]
    # Noun-phrase fragments (web alt-text): no finite verb, no sentence punctuation.
    words = Counter(w for row in captions for w in row["caption"].split())
    assert not {"is", "are", "shows", "has", "have", ".", "?"} & set(words)
    assert words["a"] + words["an"] + words["one"] > 0 and words["two"] > 0
    assert sum(words.values()) + sum(len(row["caption"].split()) for row in talk) == world.caption_words
    assert set(COLOURS) <= set(words) and set(RADII) <= set(words)


def test_some_pictures_come_with_true_colour_talk(world: DemoWorld) -> None:
    """Picture-book talk, "what colour are the circles ? red .": the answer is the picture's colour."""
    rows = read_jsonl(world.captions)
    talk = [row for row in rows if row["caption"].startswith("what colour ")]
    assert 0.1 <= len(talk) / len(rows) <= 0.2
    for row in talk[:100]:
        *question, answer, stop = row["caption"].split()
        assert question[-1] == "?" and stop == "." and answer in COLOURS
        with Image.open(world.captions.parent / row["path"]) as image:
            shape_pixels = [p for p in image.getdata() if max(abs(c - BACKGROUND) for c in p) > 60]
        nearest = Counter(min(RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(RGB[c], p))) for p in shape_pixels)
        assert nearest.most_common(1)[0][0] == answer


def test_captions_are_half_of_the_multimodal_twins_words(world: DemoWorld) -> None:
    """With the default sizes, as in BabyLM's multimodal track (text corpus + as many caption words)."""
    assert 0.45 <= world.caption_words / (world.caption_words + world.words) <= 0.55


def test_blimp_pairs_match_real_blimp_format(world: DemoWorld, meta: dict, real_blimp: Path) -> None:
    real = read_jsonl(real_blimp / "adjunct_island.jsonl")[0]
    held_out = set(meta["lexicon"]["held_out_words"])
    files = sorted(world.blimp_dir.glob("*.jsonl"))
    assert len(files) >= 4 and {f.stem for f in files} == set(world.pairs_per_uid)
    for path in files:
        rows = read_jsonl(path)
        assert len(rows) == world.pairs_per_uid[path.stem] >= 150
        assert len({(r["sentence_good"], r["sentence_bad"]) for r in rows}) == len(rows)
        assert [r["pairID"] for r in rows] == [str(i) for i in range(len(rows))]
        for row in rows:
            assert {k: type(v) for k, v in row.items()} == {k: type(v) for k, v in real.items()}
            assert row["UID"] == path.stem and row["simple_LM_method"] is True
            good, bad = row["sentence_good"].split(), row["sentence_bad"].split()
            assert len(good) == len(bad)
            assert sum(g != b for g, b in zip(good, bad)) == 1
            assert held_out & set(good)


def test_winoground_items(world: DemoWorld) -> None:
    items = read_jsonl(world.winoground)
    images = {row["image_id"]: row for row in read_jsonl(world.eval_images)}
    training_ids = {row["image_id"] for row in read_jsonl(world.captions)}
    assert len(items) == world.winoground_items >= 100
    assert not training_ids & set(images)
    tags = Counter(item["collapsed_tag"] for item in items)
    assert set(tags) == {"attribute", "binding"} and tags["attribute"] > tags["binding"] >= 30
    for item in items:
        assert set(item) == {"id", "caption_0", "caption_1", "image_0", "image_1", "num_main_preds", "collapsed_tag", "tag"}
        assert item["caption_0"] != item["caption_1"]
        same_words = Counter(item["caption_0"].split()) == Counter(item["caption_1"].split())
        # Binding swaps rearrange the same words; attribute items change a colour, number or size.
        assert same_words == (item["collapsed_tag"] == "binding")
        for k in (0, 1):
            row = images[item[f"image_{k}"]]
            assert row["caption"] == item[f"caption_{k}"]
            assert (world.eval_images.parent / row["path"]).is_file()
    attribute_tags = Counter(item["tag"] for item in items if item["collapsed_tag"] == "attribute")
    assert set(attribute_tags) == {"Adjective-Color", "Numeral", "Adjective-Size"}


def test_vqa_items_are_in_babylms_format_with_balanced_answers(world: DemoWorld) -> None:
    items = read_jsonl(world.vqa)
    images = {row["image_id"] for row in read_jsonl(world.eval_images)}
    assert len(items) == world.vqa_items >= 100
    corpus = set(world.text_train.read_text(encoding="utf-8").splitlines())
    for item in items:
        assert set(item) == {"question", "target_ans", "distractors", "image_id", "question_id"}
        assert len(item["distractors"]) == 7 and {item["target_ans"], *item["distractors"]} == set(COLOURS)
        assert item["image_id"] in images and item["question"].startswith("what colour ")
        # The question's form is one the text corpus holds (with an answer that no picture backs).
        assert any(line.startswith(item["question"].rsplit(" ", 2)[0]) for line in corpus)
    counts = Counter(item["target_ans"] for item in items)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({item["question_id"] for item in items}) == len(items)


def probe_accuracy(features, labels: list, train: int) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised features (torch, L-BFGS)."""
    import torch

    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    x = (features - features[:train].mean(0)) / (features[:train].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x[:train] @ w + b, y[:train]) + 1e-3 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    return float(((x[train:] @ w + b).argmax(1) == y[train:]).float().mean())


def test_pooled_features_carry_colour_and_size(world: DemoWorld) -> None:
    """A linear probe on the encoder's pooled feature (the paper's: layer -2, mean over patches)
    reads the attributes that decide caption words."""
    import random

    import torch

    from vlmerge.precompute.encoder import load_encoder

    encoder, processor = load_encoder(str(world.encoder_dir), -2, "mean_patch")
    rng = random.Random(5)
    groups = [random_group(rng, 4) for _ in range(600)]
    pixels = processor(images=[render(Scene((g,)), rng) for g in groups], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = encoder(pixels)
    assert probe_accuracy(features, [g.colour for g in groups], 400) >= 0.85  # chance 1/8
    assert probe_accuracy(features, [g.size for g in groups], 400) >= 0.8  # chance 1/2


def test_encoder_runs_on_a_demo_image(world: DemoWorld) -> None:
    import torch
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(world.encoder_dir).eval()
    processor = AutoImageProcessor.from_pretrained(world.encoder_dir)
    path = world.captions.parent / read_jsonl(world.captions)[0]["path"]
    with Image.open(path) as image:
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 56, 56)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, 1 + (56 // 14) ** 2, 64)
    assert torch.isfinite(hidden).all()


def test_same_seed_gives_identical_files(world: DemoWorld, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", seed=0, progress=False)
    assert file_hashes(again.root) == file_hashes(world.root)


def test_other_seed_gives_other_corpus(world: DemoWorld, tmp_path: Path) -> None:
    other = generate(tmp_path / "other", seed=1, progress=False, **SMALL)
    lines = other.text_train.read_text(encoding="utf-8").splitlines()
    assert lines != world.text_train.read_text(encoding="utf-8").splitlines()[: len(lines)]


def test_rerun_returns_existing_world_untouched(world: DemoWorld) -> None:
    before = {p: p.stat().st_mtime_ns for p in world.root.rglob("*")}
    assert generate(world.root, seed=0, progress=False) == world
    assert {p: p.stat().st_mtime_ns for p in world.root.rglob("*")} == before


def test_rerun_with_other_parameters_refuses(world: DemoWorld) -> None:
    with pytest.raises(FileExistsError, match="n_images"):
        generate(world.root, seed=0, n_images=10, progress=False)


def test_refuses_a_directory_that_is_not_a_world(tmp_path: Path) -> None:
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a demo world"):
        generate(tmp_path, progress=False, **SMALL)


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="n_images"):
        generate("unused", n_images=0)


def test_word_forms() -> None:
    assert [add_s(w) for w in ("dog", "box", "cross", "puppy", "monkey", "catch", "cry", "say")] == [
        "dogs", "boxes", "crosses", "puppies", "monkeys", "catches", "cries", "says",
    ]
    assert with_articles(["a", "orange", "circle", "and", "a", "big", "apple"]) == [
        "an", "orange", "circle", "and", "a", "big", "apple",
    ]
    assert set(RGB) == set(COLOURS)


# The downstream vision-language sets (demo.vl_tasks): VQAv2, Karpathy retrieval, NLVR², in their real formats.
VQA_SUBTYPES = {"train": "train2014", "val": "val2014"}


@pytest.fixture(scope="module")
def eval_manifest(world: DemoWorld) -> dict[str, dict]:
    return {row["image_id"]: row for row in read_jsonl(world.eval_images)}


def assert_listed_image(world: DemoWorld, manifest: dict[str, dict], stem: str, rel: str) -> Path:
    """The image is in eval/images.jsonl under its file stem, at `rel` (relative to eval/), and on disk."""
    assert manifest[stem]["path"] == rel and Path(rel).stem == stem and rel.endswith(".png")
    path = world.eval_images.parent / rel
    assert path.is_file()
    return path


def shape_pixels(path: Path) -> list[tuple[int, int, int]]:
    with Image.open(path) as image:
        assert (image.size, image.mode) == ((64, 64), "RGB")
        return [p for p in image.getdata() if max(abs(c - BACKGROUND) for c in p) > 60]


def test_vl_vqa_is_in_vqav2_format_with_answers_at_chance(world: DemoWorld, meta: dict, eval_manifest: dict) -> None:
    vl = meta["counts"]["vl"]
    assert vl["vqa_questions"] == {"train": 800, "val": 200} and vl["vqa_images"] == {"train": 400, "val": 100}
    for split, subtype in VQA_SUBTYPES.items():
        folder = world.root / "eval/vl/vqa"
        questions = json.loads((folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json").read_text(encoding="utf-8"))
        annotations = json.loads((folder / f"v2_mscoco_{subtype}_annotations.json").read_text(encoding="utf-8"))
        assert {k: questions[k] for k in ("task_type", "data_type", "data_subtype")} == {
            "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype}
        assert (annotations["data_type"], annotations["data_subtype"]) == ("mscoco", subtype)
        qs, anns = questions["questions"], annotations["annotations"]
        assert len(qs) == len(anns) == vl["vqa_questions"][split]
        assert len({q["image_id"] for q in qs}) == vl["vqa_images"][split]
        for q, a in zip(qs, anns):
            assert set(q) == {"image_id", "question", "question_id"} and type(q["image_id"]) is int
            assert set(a) == {"question_id", "image_id", "answers", "multiple_choice_answer", "answer_type", "question_type"}
            assert (a["question_id"], a["image_id"]) == (q["question_id"], q["image_id"])
            assert q["question_id"] // 1000 == q["image_id"] and q["question"].startswith(a["question_type"] + " ")
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] == "yes" for x in a["answers"])
            votes = Counter(x["answer"] for x in a["answers"])
            assert votes.most_common(1)[0][0] == a["multiple_choice_answer"] and votes[a["multiple_choice_answer"]] >= 7
            stem = f"COCO_{subtype}_{q['image_id']:012d}"
            path = assert_listed_image(world, eval_manifest, stem, f"vl/coco/{subtype}/{stem}.png")
            if a["answer_type"] == "other" and q["question_id"] % 7 == 0:  # some colour answers against the pixels
                pixels = Counter(min(RGB, key=lambda c: sum((x - y) ** 2 for x, y in zip(RGB[c], p))) for p in shape_pixels(path))
                assert pixels.most_common(1)[0][0] == a["multiple_choice_answer"]
        assert Counter(a["answer_type"] for a in anns) == {"other": len(anns) // 2, "number": len(anns) // 4, "yes/no": len(anns) // 4}
        # Without the image a model is at chance: the answers of each type are uniform (the question
        # says its type, not its answer), and none is more than 1/8 of all the answers.
        expected = {"other": set(COLOURS), "number": {"1", "2", "3", "4"}, "yes/no": {"yes", "no"}}
        for answer_type, values in expected.items():
            counts = Counter(a["multiple_choice_answer"] for a in anns if a["answer_type"] == answer_type)
            assert set(counts) == values and max(counts.values()) - min(counts.values()) <= 1
        asked = Counter((q["question"].split()[-2], a["multiple_choice_answer"]) for q, a in zip(qs, anns) if a["answer_type"] == "yes/no")
        assert set(asked) == {(s, y) for s in RADII for y in ("yes", "no")} and max(asked.values()) - min(asked.values()) <= 1
        assert max(Counter(a["multiple_choice_answer"] for a in anns).values()) / len(anns) <= 1 / 8 + 0.01
        assert any(a["answers"][0]["answer"] != a["multiple_choice_answer"] for a in anns)  # some annotators slip


def test_vl_retrieval_is_in_karpathys_format(world: DemoWorld, meta: dict, eval_manifest: dict) -> None:
    data = json.loads((world.root / "eval/vl/retrieval/dataset_demo.json").read_text(encoding="utf-8"))
    assert set(data) == {"images", "dataset"} and data["dataset"] == "demo"
    images = data["images"]
    assert Counter(i["split"] for i in images) == meta["counts"]["vl"]["retrieval_images"] == {"train": 300, "val": 50, "test": 100}
    sentid = 0
    for imgid, image in enumerate(images):
        assert set(image) == {"filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid"}
        assert image["imgid"] == imgid and image["filepath"] == ("train2014" if image["split"] == "train" else "val2014")
        assert image["filename"] == f"COCO_{image['filepath']}_{image['cocoid']:012d}.png"
        assert len({s["raw"] for s in image["sentences"]}) == len(image["sentences"]) == 5
        for s in image["sentences"]:
            assert s == {"tokens": s["raw"].split(), "raw": s["raw"], "imgid": imgid, "sentid": sentid}
            sentid += 1
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        stem = image["filename"].removesuffix(".png")
        assert_listed_image(world, eval_manifest, stem, f"vl/coco/{image['filepath']}/{image['filename']}")
    # The test images differ in what a pooled vector reads (the manifest's caption names every group's
    # count, size, colour and shape), so text alone ranks at chance and the image separates them.
    test = [eval_manifest[i["filename"].removesuffix(".png")]["caption"] for i in images if i["split"] == "test"]
    assert len(set(test)) == len(test)
    coco = [row for row in eval_manifest.values() if row["path"].startswith("vl/coco/")]
    assert len(coco) == 500 + 450  # VQA's and retrieval's COCO ids are disjoint


def test_vl_nlvr2_is_in_nlvr2s_format_with_balanced_labels(world: DemoWorld, meta: dict, eval_manifest: dict) -> None:
    import re

    for split, n in {"train": 600, "dev": 200}.items():
        lines = (world.root / f"eval/vl/nlvr2/{split}.json").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines]  # JSON lines, as the release's train.json
        assert len(rows) == meta["counts"]["vl"]["nlvr2_items"][split] == n
        assert len({r["identifier"] for r in rows}) == n
        assert Counter(r["label"] for r in rows) == {"True": n // 2, "False": n // 2}
        # Each statement is True of one image pair and False of another: text alone is at chance.
        by_sentence = Counter((r["sentence"], r["label"]) for r in rows)
        assert all(by_sentence[(s, "True")] == by_sentence[(s, "False")] for s, _ in by_sentence)
        for row in rows:
            assert re.fullmatch(rf"{split}-\d+-\d+-\d+", row["identifier"])
            assert set(row) == ({"identifier", "sentence", "label", "directory"} if split == "train" else {"identifier", "sentence", "label"})
            folder = f"images/train/{row['directory']}" if split == "train" else f"images/{split}"
            pair = row["identifier"].rsplit("-", 1)[0]
            left, right = (assert_listed_image(world, eval_manifest, f"{pair}-img{k}", f"vl/nlvr2/{folder}/{pair}-img{k}.png")
                           for k in (0, 1))
            words = row["sentence"].split()
            if words[:4] == ["the", "left", "image", "has"] and words[4] in ("more", "fewer", "bigger", "smaller"):
                # One colour and shape: the shapes' area decides more/bigger (same size, or same count).
                more = len(shape_pixels(left)) > len(shape_pixels(right))
                assert (row["label"] == "True") == (more == (words[4] in ("more", "bigger"))), row


def test_vl_sets_are_deterministic_and_leave_the_older_files_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmerge.demo.world as world_module

    first = file_hashes(generate(tmp_path / "first", seed=3, progress=False, **SMALL).root)
    assert file_hashes(generate(tmp_path / "again", seed=3, progress=False, **SMALL).root) == first
    assert any(k.startswith("eval/vl/nlvr2/images/") for k in first) and "eval/vl/retrieval/dataset_demo.json" in first
    monkeypatch.setattr(world_module, "write_vl_tasks", lambda *args, **kwargs: {})
    without = generate(tmp_path / "without", seed=3, progress=False, **SMALL).root
    changed = {"world.json", "eval/images.jsonl"}  # the vl counts; the vl images' rows appended
    older = {k: v for k, v in file_hashes(without).items() if k not in changed}
    assert {k: v for k, v in first.items() if not k.startswith("eval/vl/") and k not in changed} == older
    metas = [json.loads((root / "world.json").read_text(encoding="utf-8")) for root in (tmp_path / "first", without)]
    vl = metas[0]["counts"].pop("vl")
    assert metas[1]["counts"].pop("vl") == {} and metas[0] == metas[1]
    before = (without / "eval/images.jsonl").read_text(encoding="utf-8")
    after = (tmp_path / "first/eval/images.jsonl").read_text(encoding="utf-8")
    assert after.startswith(before)
    vl_rows = [json.loads(line) for line in after.removeprefix(before).splitlines()]
    assert {f"eval/{row['path']}" for row in vl_rows} == {k for k in first if k.startswith("eval/vl/") and k.endswith(".png")}
    assert len(vl_rows) == len({row["image_id"] for row in vl_rows}) == vl["images"] > 0
