"""Generate the demo world: text corpus, captioned images, evaluation sets and a tiny DINOv2.

Layout under the output directory (paths relative to it):

    world.json                  seed, parameters, counts, lexicon split, format version
    text/train.txt              text-only corpus, one utterance per line
    text/dev.txt                held-out sentences of the same grammar (perplexity)
    images/<image_id>.png       64×64 RGB scenes of coloured shapes (img-…: training, wg-…: eval)
    captions.jsonl              {"image_id", "path", "caption"} for the training images
    eval/images.jsonl           the same for the evaluation images (wg-…, vqa-…, then eval/vl/'s; "path" relative to eval/)
    eval/blimp/<UID>.jsonl      BLiMP-format minimal pairs on held-out words
    eval/winoground.jsonl       Winoground-format items (Hugging Face export fields; collapsed_tag
                                "attribute" or "binding")
    eval/vqa.jsonl              BabyLM-format VQA: question, target_ans, 7 distractors, image_id
    eval/entity_tracking/, eval/wug_adj_nominalization/   BabyLM-format files (demo.babylm_tasks)
    eval/glue/cola.{train,valid}.jsonl                    acceptability in BabyLM's glue_filtered format
    eval/vl/vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json, v2_mscoco_{train,val}2014_annotations.json
                                VQAv2-format fine-tuning set (demo.vl_tasks)
    eval/vl/retrieval/dataset_demo.json                   image–text retrieval in Karpathy's split format
    eval/vl/nlvr2/{train,dev}.json                        NLVR²'s JSONL (images: eval/vl/nlvr2/images/)
    eval/vl/coco/{train2014,val2014}/COCO_*.png           VQA's and retrieval's images, named as COCO's
                                (these and NLVR²'s are appended to eval/images.jsonl, image_id = stem)
    dinov2-tiny/                randomly initialised DINOv2 + image processor (save_pretrained)

Everything follows from the seed and the parameters: the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vlmerge.config import DemoConfig
from vlmerge.demo.grammar import Grammar, full_lexicon, sample_corpus, split_lexicon
from vlmerge.demo.babylm_tasks import write_acceptability, write_babylm_tasks
from vlmerge.demo.images import (
    BACKGROUND, CaptionStyle, Scene, caption, picture_talk, random_scene, random_style, render,
)
from vlmerge.demo.tasks import PHENOMENA, minimal_pairs, vqa_items, winoground_items
from vlmerge.demo.vl_tasks import write_vl_tasks
from vlmerge.errors import VlmergeError
from vlmerge.io import atomic_path, remove_stale_temps, write_json, write_jsonl, write_text

FORMAT_VERSION = 5
FILES = {
    "text_train": "text/train.txt",
    "text_dev": "text/dev.txt",
    "images_dir": "images",
    "captions": "captions.jsonl",
    "eval_images": "eval/images.jsonl",
    "blimp_dir": "eval/blimp",
    "winoground": "eval/winoground.jsonl",
    "vqa": "eval/vqa.jsonl",
    "encoder_dir": "dinov2-tiny",
}
DEV_FRACTION = 0.05
# Of the one-group training pictures: the share that comes with picture-book talk ("what colour
# are the circles ? red .") instead of a caption. The text corpus asks the same questions with no
# picture (grammar.COLOUR_EXCHANGE_SHARE), so only the multimodal twin can learn to answer them.
PICTURE_TALK_SHARE = 0.2
ENCODER_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "mlp_ratio": 2,
    "image_size": 56,
    "patch_size": 14,
}
# Pixel normalisation of the demo encoder: centred on the images' flat background (images.py), so
# that background patches enter the encoder as zeros and the pooled feature varies with the shapes
# alone (ImageNet's mean would leave the background as most of every image's feature).
PIXEL_MEAN = [BACKGROUND / 255] * 3
PIXEL_STD = [0.25] * 3


class WorldExistsError(VlmergeError, FileExistsError):
    """The output directory holds something other than the world asked for."""


@dataclass(frozen=True)
class DemoWorld:
    """Where a generated demo world lies, and how much it holds."""

    root: Path
    seed: int
    text_train: Path
    text_dev: Path
    images_dir: Path
    captions: Path
    eval_images: Path
    blimp_dir: Path
    winoground: Path
    vqa: Path
    encoder_dir: Path
    words: int  # whitespace-separated words in text_train
    images: int  # training images
    caption_words: int  # whitespace-separated words in captions.jsonl
    winoground_items: int
    vqa_items: int
    pairs_per_uid: Mapping[str, int] = field(hash=False)

    @classmethod
    def load(cls, root: str | Path) -> DemoWorld:
        """Read an existing world from its world.json."""
        root = Path(root)
        meta = json.loads((root / "world.json").read_text(encoding="utf-8"))
        counts = meta["counts"]
        return cls(
            root=root,
            seed=meta["seed"],
            **{name: root / rel for name, rel in meta["files"].items()},
            words=counts["words"],
            images=counts["images"],
            caption_words=counts["caption_words"],
            winoground_items=counts["winoground_items"],
            vqa_items=counts["vqa_items"],
            pairs_per_uid=counts["blimp_pairs"],
        )


_DEFAULTS = DemoConfig()  # `vlmerge demo-data` and this function share one set of defaults


def generate(
    out_dir: str | Path,
    seed: int = 0,
    *,
    text_words: int = _DEFAULTS.text_words,
    n_images: int = _DEFAULTS.n_images,
    n_winoground: int = _DEFAULTS.n_winoground,
    pairs_per_phenomenon: int = _DEFAULTS.pairs_per_phenomenon,
    progress: bool = True,
) -> DemoWorld:
    """Write the demo world into `out_dir` (it appears complete or not at all) and describe it.

    `n_winoground` is also the number of VQA questions. A world already there with the same
    seed and parameters is returned as it is; one with other parameters raises FileExistsError.
    """
    out_dir = Path(out_dir)
    params = {
        "text_words": text_words,
        "n_images": n_images,
        "n_winoground": n_winoground,
        "pairs_per_phenomenon": pairs_per_phenomenon,
    }
    _validate(seed, params)
    remove_stale_temps(out_dir.parent)  # the temp folders of killed runs
    existing = _existing_world(out_dir, seed, params)
    if existing is not None:
        return existing
    try:
        with atomic_path(out_dir, is_dir=True) as tmp:
            _build(tmp, seed, params, progress)
    except FileExistsError:
        # Another process finished first: fine if it wrote the same world.
        existing = _existing_world(out_dir, seed, params)
        if existing is None:
            raise
        return existing
    return DemoWorld.load(out_dir)


def _validate(seed: int, params: dict[str, int]) -> None:
    for name, value in {"seed": seed, **params}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            bound = "a non-negative" if name == "seed" else "a positive"
            raise ValueError(f"{name}={value!r}: must be {bound} integer")


def _existing_world(out_dir: Path, seed: int, params: dict[str, int]) -> DemoWorld | None:
    """The world in `out_dir` if it was made with these inputs; None if there is none.

    An empty directory is removed (it would block the atomic rename); anything else raises
    FileExistsError.
    """
    if not out_dir.exists():
        return None
    meta_path = out_dir / "world.json"
    if not meta_path.is_file():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
            return None
        raise WorldExistsError(f"{out_dir}: exists and is not a demo world (no world.json); remove it or choose another directory")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    found = {"format_version": meta.get("format_version"), "seed": meta.get("seed"), **meta.get("params", {})}
    wanted = {"format_version": FORMAT_VERSION, "seed": seed, **params}
    differences = [f"{k} {found.get(k)!r} there, {v!r} asked" for k, v in wanted.items() if found.get(k) != v]
    if differences:
        raise WorldExistsError(
            f"{out_dir}: demo world made with other parameters ({'; '.join(differences)}); remove it or choose another directory"
        )
    return DemoWorld.load(out_dir)


def _rng(seed: int, stream: str) -> random.Random:
    """An independent random stream per purpose, so one part can change without moving the others."""
    return random.Random(f"vlmerge.demo:{seed}:{stream}")


def _build(root: Path, seed: int, params: dict[str, int], progress: bool) -> None:
    lexicon = full_lexicon()
    train_lexicon, held_out = split_lexicon(lexicon, _rng(seed, "lexicon"))

    train = sample_corpus(Grammar(train_lexicon, _rng(seed, "train")), params["text_words"])
    dev_words = max(1, round(DEV_FRACTION * params["text_words"]))
    dev = sample_corpus(Grammar(train_lexicon, _rng(seed, "dev")), dev_words, exclude=frozenset(train))
    write_text(root / FILES["text_train"], "".join(line + "\n" for line in train))
    write_text(root / FILES["text_dev"], "".join(line + "\n" for line in dev))

    scene_rng = _rng(seed, "scenes")
    scenes = {f"img-{i:06d}": random_scene(scene_rng) for i in range(params["n_images"])}
    talk_rng = _rng(seed, "picture_talk")
    captions = [
        (image_id, picture_talk(scene) if len(scene.groups) == 1 and talk_rng.random() < PICTURE_TALK_SHARE
         else caption(scene, random_style(scene_rng)))
        for image_id, scene in scenes.items()
    ]
    items = winoground_items(params["n_winoground"], _rng(seed, "winoground"))
    questions = vqa_items(params["n_winoground"], _rng(seed, "vqa"))
    eval_images = {item.image_id(k): (item.scenes[k], item.captions[k]) for item in items for k in (0, 1)}
    eval_images |= {q.image_id: (q.scene, caption(q.scene, CaptionStyle("", "", "and", True, False))) for q in questions}

    images_dir = root / FILES["images_dir"]
    _render_all(images_dir, {**scenes, **{i: s for i, (s, _) in eval_images.items()}}, seed, progress)
    write_jsonl(root / FILES["captions"], _manifest(captions, "images"))
    write_jsonl(root / FILES["eval_images"], _manifest([(i, c) for i, (_, c) in eval_images.items()], "../images"))
    write_jsonl(root / FILES["winoground"], (item.to_json() for item in items))
    write_jsonl(root / FILES["vqa"], (q.to_json() for q in questions))

    blimp_pairs = {}
    for phenomenon in PHENOMENA:
        grammar = Grammar(lexicon, _rng(seed, f"blimp/{phenomenon.uid}"))
        rows = minimal_pairs(phenomenon, grammar, held_out, params["pairs_per_phenomenon"])
        blimp_pairs[phenomenon.uid] = write_jsonl(root / FILES["blimp_dir"] / f"{phenomenon.uid}.jsonl", rows)

    babylm_items = write_babylm_tasks(root, sorted(n.singular for n in lexicon.nouns if n.kind == "thing"),
                                      _rng(seed, "babylm_tasks"))
    acceptability = write_acceptability(root, lexicon, train_lexicon, params["pairs_per_phenomenon"], _rng(seed, "glue"))
    vl = write_vl_tasks(root, params["n_images"], vqa_rng=_rng(seed, "vl/vqa"), retrieval_rng=_rng(seed, "vl/retrieval"),
                        nlvr2_rng=_rng(seed, "vl/nlvr2"), render_rng=lambda image_id: _rng(seed, f"render/{image_id}"))
    save_random_dinov2(root / FILES["encoder_dir"], seed)

    write_json(root / "world.json", {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "params": params,
        "files": FILES,
        "counts": {
            "words": sum(len(line.split()) for line in train),
            "dev_words": sum(len(line.split()) for line in dev),
            "images": len(scenes),
            "caption_words": sum(len(text.split()) for _, text in captions),
            "eval_images": len(eval_images),
            "winoground_items": len(items),
            "vqa_items": len(questions),
            "blimp_pairs": blimp_pairs,
            "babylm_tasks": babylm_items,
            "acceptability": acceptability,
            "vl": vl,
        },
        "lexicon": {
            "train": train_lexicon.to_json(),
            "held_out": held_out.to_json(),
            "held_out_words": sorted(held_out.words()),
        },
    })


def _render_all(images_dir: Path, scenes: dict[str, Scene], seed: int, progress: bool) -> None:
    """Render every scene to images_dir/<image_id>.png; each image has its own random stream."""
    images_dir.mkdir(parents=True)
    for image_id, scene in tqdm(scenes.items(), desc="demo images", unit="img", disable=not progress, file=sys.stderr):
        render(scene, _rng(seed, f"render/{image_id}")).save(images_dir / f"{image_id}.png", format="PNG")


def _manifest(captions: list[tuple[str, str]], images_rel: str) -> list[dict[str, str]]:
    """Manifest rows of (image id, caption); `images_rel` is the images folder relative to the manifest's folder."""
    return [
        {"image_id": image_id, "path": f"{images_rel}/{image_id}.png", "caption": text}
        for image_id, text in captions
    ]


def save_random_dinov2(out_dir: Path, seed: int, **config: int) -> Path:
    """Save a randomly initialised DINOv2 and its image processor; `config` overrides ENCODER_CONFIG.

    The default (4 layers, width 64, 56×56 input) stands in for dinov2-large in the demo. The
    processor resizes the short side to 8/7 of the input size and centre-crops it (DINOv2's
    256 → 224), and normalises pixels around the demo's background (PIXEL_MEAN, PIXEL_STD).
    """
    import torch  # heavy imports, needed by this step only
    import transformers

    from vlmerge.hf import quiet_transformers

    config = {**ENCODER_CONFIG, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Dinov2Model(transformers.Dinov2Config(**config))
    with quiet_transformers():  # a one-shard "Writing model shards" bar is noise
        model.save_pretrained(out_dir)
    # The Pil variant needs no torchvision; both variants save and load as "BitImageProcessor".
    processor_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    size = config["image_size"]
    processor = processor_cls(
        do_resize=True,
        size={"shortest_edge": size * 8 // 7},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=PIXEL_MEAN,
        image_std=PIXEL_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(out_dir)
    return Path(out_dir)
