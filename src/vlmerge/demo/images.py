"""Scenes of coloured shapes: sampling, rendering to 64×64 PNG-ready images, and faithful captions.

A scene is one group of identical shapes, or two groups in a spatial relation ("above",
"below", "left", "right": where the first group is relative to the second). Every shape of
the first group lies in the half of the canvas that the relation names.

Built so that a model fed ONE pooled vector per image can use the image: the attributes that
decide caption words survive a mean over patches. Colour fills a flat, fixed background's
share of pixels with a saturated hue; size and count set how many pixels it fills (a big
shape has about five times a small one's area, so four small shapes cover less than one big
one). Captions are in a caption register (web alt-text): noun-phrase fragments without a
finite verb, e.g. "a picture of two small red circles above a big blue square". Some
pictures of one group come with picture-book talk instead, a colour question and its answer
("what colour are the circles ? red ."), as a caregiver asks about a picture.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vlmerge.demo.grammar import SHAPES, add_s, colour_question, with_articles

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4× and downsample, for anti-aliased edges
RGB = {  # keyed by grammar.COLOURS
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "pink": (245, 125, 190),
    "brown": (130, 80, 30),
}
RADII = {"small": (4.0, 4.5), "big": (8.8, 9.5)}  # the radius of a circle of the same area, in pixels
RELATIONS = ("above", "below", "left", "right")
RELATION_WORDS = {"above": "above", "below": "below", "left": "to the left of", "right": "to the right of"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
BACKGROUND = 240  # flat light grey: what varies between images is the shapes
PREFIXES = ("", "", "a picture of", "a photo of", "an image of", "close up of")
SUFFIXES = ("", "", "on a white background", "in the middle", "on a grey background")
PAIR_TEMPLATES = ("relation", "and")


@dataclass(frozen=True)
class Group:
    count: int
    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]  # one or two
    relation: str | None = None  # where groups[0] is relative to groups[1]


def random_group(rng: random.Random, max_count: int) -> Group:
    count = rng.randint(1, max_count)
    return Group(count, rng.choice(list(RADII)), rng.choice(list(RGB)), rng.choice(SHAPES))


def random_scene(rng: random.Random) -> Scene:
    """One group of 1–4 shapes (three times in four) or two groups of 1–2 in a relation."""
    if rng.random() < 0.75:
        return Scene((random_group(rng, 4),))
    return Scene((random_group(rng, 2), random_group(rng, 2)), rng.choice(RELATIONS))


# Rendering
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _regions(scene: Scene) -> list[Box]:
    """The part of the canvas each group occupies."""
    s, h = IMAGE_SIZE, IMAGE_SIZE / 2
    if scene.relation is None:
        return [(0, 0, s, s)]
    first, second = {
        "above": ((0, 0, s, h), (0, h, s, s)),
        "below": ((0, h, s, s), (0, 0, s, h)),
        "left": ((0, 0, h, s), (h, 0, s, s)),
        "right": ((h, 0, s, s), (0, 0, h, s)),
    }[scene.relation]
    return [first, second]


def _cells(region: Box, count: int, rng: random.Random) -> list[Box]:
    """Split a region into `count` cells of at least 32×32 pixels, one per shape."""
    x0, y0, x1, y1 = region
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if count == 1:
        return [region]
    if count == 2:
        horizontal = x1 - x0 > y1 - y0 or (x1 - x0 == y1 - y0 and rng.random() < 0.5)
        return [(x0, y0, xm, y1), (xm, y0, x1, y1)] if horizontal else [(x0, y0, x1, ym), (x0, ym, x1, y1)]
    grid = [(x0, y0, xm, ym), (xm, y0, x1, ym), (x0, ym, xm, y1), (xm, ym, x1, y1)]
    return [grid[i] for i in sorted(rng.sample(range(4), count))]


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy) within radius r (not for circles)."""

    def ring(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        step = 2 * math.pi / len(radii)
        start = math.radians(start_deg)
        return [(cx + q * math.cos(start + i * step), cy + q * math.sin(start + i * step)) for i, q in enumerate(radii)]

    if shape == "square":
        return ring([1.2 * r] * 4, 45)
    if shape == "diamond":
        return ring([r] * 4, -90)
    if shape == "triangle":
        return [(x, y + 0.25 * r) for x, y in ring([1.15 * r] * 3, -90)]
    if shape == "star":
        return ring([r, 0.45 * r] * 5, -90)
    if shape == "hexagon":
        return ring([r] * 6, 0)
    if shape == "cross":
        w = 0.35 * r
        offsets = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _area(points: list[tuple[float, float]]) -> float:
    """The area of a simple polygon (shoelace formula)."""
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


# Radius factor that gives every shape a circle's area: the pixels a group covers then follow from
# its count and size alone, which a mean over patches keeps.
EQUAL_AREA = {s: 1.0 if s == "circle" else math.sqrt(math.pi / _area(shape_points(s, 0, 0, 1))) for s in SHAPES}


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw the scene on a light background; positions, radii and tints come from `rng`."""
    k = SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(image)
    for group, region in zip(scene.groups, _regions(scene)):
        for x0, y0, x1, y1 in _cells(region, group.count, rng):
            r = rng.uniform(*RADII[group.size]) * EQUAL_AREA[group.shape]
            cx, cy = rng.uniform(x0 + r + 1, x1 - r - 1), rng.uniform(y0 + r + 1, y1 - r - 1)
            fill = tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in RGB[group.colour])
            if group.shape == "circle":
                draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=fill)
            else:
                draw.polygon([(x * k, y * k) for x, y in shape_points(group.shape, cx, cy, r)], fill=fill)
    return image.reduce(k)


# Captions
@dataclass(frozen=True)
class CaptionStyle:
    """The wording choices of a caption, drawn independently of the scene it describes."""

    prefix: str  # one of PREFIXES ("" for none)
    suffix: str  # one of SUFFIXES
    pair: str  # one of PAIR_TEMPLATES
    with_size: bool
    numeral_one: bool  # "one red circle" instead of "a red circle"


def random_style(rng: random.Random, pair_templates: tuple[str, ...] = PAIR_TEMPLATES) -> CaptionStyle:
    return CaptionStyle(rng.choice(PREFIXES), rng.choice(SUFFIXES), rng.choice(pair_templates),
                        rng.random() < 0.75, rng.random() < 0.15)


def _group_words(group: Group, style: CaptionStyle) -> list[str]:
    number = NUMBERS.get(group.count, "one" if style.numeral_one else "a")
    size = [group.size] if style.with_size else []
    shape = group.shape if group.count == 1 else add_s(group.shape)
    return [number, *size, group.colour, shape]


def caption(scene: Scene, style: CaptionStyle) -> str:
    """A noun-phrase caption true of the scene, e.g. "a picture of two small red circles above a blue square"."""
    words = _group_words(scene.groups[0], style)
    if scene.relation is not None:
        link = RELATION_WORDS[scene.relation].split() if style.pair == "relation" else ["and"]
        words += [*link, *_group_words(scene.groups[1], style)]
    return " ".join(with_articles([*style.prefix.split(), *words, *style.suffix.split()]))


def group_colour_question(group: Group) -> list[str]:
    """ "what colour is the circle ?" / "what colour are the circles ?" about one group."""
    plural = group.count > 1
    return colour_question(add_s(group.shape) if plural else group.shape, plural)


def picture_talk(scene: Scene) -> str:
    """A colour question about a one-group picture and its answer: "what colour are the circles ? red ."."""
    if len(scene.groups) != 1:
        raise ValueError(f"picture talk is about one-group scenes; this one has {len(scene.groups)} groups")
    return " ".join([*group_colour_question(scene.groups[0]), scene.groups[0].colour, "."])
