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
from vlmerge.demo.images import RGB

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
    assert sum(len(line.split()) for line in train) == world.words >= 100_000
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


def test_images_have_one_caption_each(world: DemoWorld) -> None:
    rows = read_jsonl(world.captions)
    assert len(rows) == world.images >= 2000
    assert len({row["image_id"] for row in rows}) == len(rows)
    for row in rows:
        with Image.open(world.captions.parent / row["path"]) as image:
            assert (image.size, image.mode) == ((64, 64), "RGB")
        assert row["caption"].endswith(" .")
    on_disk = {p.stem for p in world.images_dir.glob("img-*.png")}
    assert on_disk == {row["image_id"] for row in rows}


def test_blimp_pairs_match_real_blimp_format(world: DemoWorld, meta: dict, real_blimp: Path) -> None:
    real = read_jsonl(real_blimp / "adjunct_island.jsonl")[0]
    held_out = set(meta["lexicon"]["held_out_words"])
    files = sorted(world.blimp_dir.glob("*.jsonl"))
    assert len(files) >= 4 and {f.stem for f in files} == set(world.pairs_per_uid)
    for path in files:
        rows = read_jsonl(path)
        assert len(rows) == world.pairs_per_uid[path.stem] >= 200
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
    for item in items:
        assert set(item) == {"id", "caption_0", "caption_1", "image_0", "image_1", "num_main_preds", "collapsed_tag", "tag"}
        assert item["caption_0"] != item["caption_1"]
        assert Counter(item["caption_0"].split()) == Counter(item["caption_1"].split())
        for k in (0, 1):
            row = images[item[f"image_{k}"]]
            assert row["caption"] == item[f"caption_{k}"]
            assert (world.eval_images.parent / row["path"]).is_file()


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
