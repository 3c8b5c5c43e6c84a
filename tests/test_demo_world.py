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
