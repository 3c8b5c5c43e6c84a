"""Evaluation items in the formats of real benchmarks.

BLiMP-format minimal pairs built on held-out words (each pair differs in one word);
Winoground-format items of two kinds, tagged apart: attribute differences (the two images
differ in the colour, number or size of their shapes, which one pooled vector carries) and
binding swaps (two groups exchange an attribute or their places: both captions hold the same
words, and both images the same attributes, so one pooled vector cannot tell them apart); and
a VQA set in BabyLM's 8-way format ("what colour is the circle ?": the colour and the other 7).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from vlmerge.demo.grammar import (
    COLOURS, PLURAL_REFLEXIVE, REFLEXIVES, Grammar, Lexicon, Phrase, with_articles,
)
from vlmerge.demo.images import (
    NUMBERS, PAIR_TEMPLATES, RADII, RELATIONS, Scene, caption, group_colour_question, random_group, random_style,
)

DEMONSTRATIVES = {False: ("this", "that"), True: ("these", "those")}
MAX_ATTEMPTS_PER_PAIR = 100


@dataclass(frozen=True)
class MinimalPair:
    """A good sentence and the one-word substitution that makes it bad."""

    words: tuple[str, ...]
    index: int
    replacement: str

    @property
    def good(self) -> str:
        return " ".join(self.words)

    @property
    def bad(self) -> str:
        return " ".join((*self.words[: self.index], self.replacement, *self.words[self.index + 1 :]))


def _pair(words: list[str], index: int, replacement: str) -> MinimalPair:
    return MinimalPair(tuple(with_articles(words)), index, replacement)


# Builders: (grammar over the whole lexicon, held-out lexicon) -> a pair, or None to try again.
Builder = Callable[[Grammar, Lexicon], MinimalPair | None]


def _determiner_noun(g: Grammar, held: Lexicon) -> MinimalPair:
    """ "John sees these foxes ." / "John sees these fox ."."""
    noun = g.rng.choice(held.nouns)
    plural = g.rng.random() < 0.5
    subject = g.argument(g.max_depth, animate=True)
    obj = g.noun_phrase(g.max_depth, noun=noun, plural=plural, determiner=g.rng.choice(DEMONSTRATIVES[plural]))
    words = [*subject.words, g.transitive_verb(noun.animate).form(subject.plural), *obj.words, "."]
    return _pair(words, len(words) - 2, noun.form(not plural))


def _subject_verb(g: Grammar, subject: Phrase, modifier: list[str]) -> MinimalPair:
    """Subject, optional attractor-bearing modifier, predicate; the bad sentence flips the verb's number."""
    predicate = g.predicate(subject, g.max_depth)
    words = [*subject.words, *modifier, *predicate, "."]
    index = len(subject.words) + len(modifier)
    return _pair(words, index, g.other_number(predicate[0]))


def _held_subject(g: Grammar, held: Lexicon, irregular: bool | None = None) -> Phrase:
    nouns = [n for n in held.nouns if irregular is None or n.irregular == irregular]
    return g.noun_phrase(g.max_depth, noun=g.rng.choice(nouns))


def _regular_plural(g: Grammar, held: Lexicon) -> MinimalPair:
    """ "the foxes run ." / "the foxes runs ."."""
    return _subject_verb(g, _held_subject(g, held, irregular=False), [])


def _irregular_plural(g: Grammar, held: Lexicon) -> MinimalPair:
    """ "these mice are happy ." / "these mice is happy ."."""
    return _subject_verb(g, _held_subject(g, held, irregular=True), [])


def _relative_clause_distractor(g: Grammar, held: Lexicon) -> MinimalPair:
    """ "the fox that the cats chase runs ." / "… chase run ."."""
    head = _held_subject(g, held)
    attractor = g.noun_phrase(g.max_depth, plural=not head.plural, animate=True)
    return _subject_verb(g, head, g.relative_clause(head, g.max_depth, other=attractor))


def _prepositional_phrase_distractor(g: Grammar, held: Lexicon) -> MinimalPair:
    """ "the fox near the cats is happy ." / "… near the cats are happy ."."""
    head = _held_subject(g, held)
    attractor = g.noun_phrase(g.max_depth, plural=not head.plural)
    return _subject_verb(g, head, g.prepositional_phrase(g.max_depth, attractor))


def _reflexive(g: Grammar, held: Lexicon, antecedent: Phrase, bad: str) -> MinimalPair:
    """The antecedent, a held-out transitive verb and the reflexive it binds (replaced by `bad`)."""
    verb = g.rng.choice([v for v in held.verbs if v.kind == "transitive"])
    words = [*antecedent.words, verb.form(antecedent.plural), antecedent.reflexive, "."]
    return _pair(words, len(words) - 2, bad)


def _anaphor_number(g: Grammar, held: Lexicon) -> MinimalPair | None:
    """ "the girls wash themselves ." / "the girls wash herself ."."""
    antecedent = g.argument(g.max_depth, animate=True)
    if antecedent.reflexive is None:
        return None
    bad = g.rng.choice(list(REFLEXIVES.values())) if antecedent.plural else PLURAL_REFLEXIVE
    return _reflexive(g, held, antecedent, bad)


def _anaphor_gender(g: Grammar, held: Lexicon) -> MinimalPair | None:
    """ "Mary washes herself ." / "Mary washes himself ."."""
    antecedent = g.argument(g.max_depth, animate=True)
    if antecedent.plural or antecedent.gender not in ("m", "f"):
        return None
    return _reflexive(g, held, antecedent, REFLEXIVES["f" if antecedent.gender == "m" else "m"])


@dataclass(frozen=True)
class Phenomenon:
    uid: str
    field: str
    linguistics_term: str
    lexically_identical: bool  # as in the real BLiMP paradigm of the same kind
    build: Builder


PHENOMENA = (
    Phenomenon("determiner_noun_agreement", "morphology", "determiner_noun_agreement", True, _determiner_noun),
    Phenomenon("regular_plural_subject_verb_agreement", "morphology", "subject_verb_agreement", False, _regular_plural),
    Phenomenon("irregular_plural_subject_verb_agreement", "morphology", "subject_verb_agreement", False, _irregular_plural),
    Phenomenon("distractor_agreement_relative_clause", "morphology", "subject_verb_agreement", False, _relative_clause_distractor),
    Phenomenon("distractor_agreement_prepositional_phrase", "morphology", "subject_verb_agreement", False, _prepositional_phrase_distractor),
    Phenomenon("anaphor_number_agreement", "morphology", "anaphor_agreement", True, _anaphor_number),
    Phenomenon("anaphor_gender_agreement", "morphology", "anaphor_agreement", False, _anaphor_gender),
)


def minimal_pairs(phenomenon: Phenomenon, grammar: Grammar, held: Lexicon, n: int) -> list[dict]:
    """`n` distinct pairs as BLiMP JSON lines (the fields of a BLiMP paradigm without prefix data)."""
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(MAX_ATTEMPTS_PER_PAIR * n):
        if len(rows) == n:
            break
        pair = phenomenon.build(grammar, held)
        if pair is None or (pair.good, pair.bad) in seen:
            continue
        seen.add((pair.good, pair.bad))
        rows.append({
            "sentence_good": pair.good,
            "sentence_bad": pair.bad,
            "field": phenomenon.field,
            "linguistics_term": phenomenon.linguistics_term,
            "UID": phenomenon.uid,
            "simple_LM_method": True,
            "one_prefix_method": False,
            "two_prefix_method": False,
            "lexically_identical": phenomenon.lexically_identical,
            "pairID": str(len(rows)),
        })
    if len(rows) < n:
        raise RuntimeError(f"{phenomenon.uid}: only {len(rows)} distinct pairs of the {n} asked for")
    return rows


# Winoground
SWAPS = {  # binding swaps: what two groups exchange -> (collapsed_tag, tag)
    "colour": ("binding", "Adjective-Color"),
    "size": ("binding", "Adjective-Size"),
    "shape": ("binding", "Noun"),
    "arguments": ("binding", "Noun Phrase"),
}
CHANGES = {  # attribute differences: what differs between the two scenes -> (collapsed_tag, tag)
    "colour": ("attribute", "Adjective-Color"),
    "count": ("attribute", "Numeral"),
    "size": ("attribute", "Adjective-Size"),
}
KINDS = {**{f"swap-{k}": v for k, v in SWAPS.items()}, **{f"change-{k}": v for k, v in CHANGES.items()}}
ATTRIBUTE_SHARE = 2 / 3  # of the Winoground items; the rest are binding swaps
CHOICES = {"colour": COLOURS, "count": (1, *NUMBERS), "size": tuple(RADII)}


def swap(scene: Scene, kind: str) -> Scene:
    """Exchange one attribute ("colour", "size", "shape") or the whole groups ("arguments")."""
    a, b = scene.groups
    if kind == "arguments":
        return Scene((b, a), scene.relation)
    return Scene((replace(a, **{kind: getattr(b, kind)}), replace(b, **{kind: getattr(a, kind)})), scene.relation)


def change(scene: Scene, kind: str, rng: random.Random) -> Scene:
    """The one-group scene with another value of one attribute ("colour", "count", "size")."""
    (group,) = scene.groups
    value = rng.choice([v for v in CHOICES[kind] if v != getattr(group, kind)])
    return Scene((replace(group, **{kind: value}),))


@dataclass(frozen=True)
class WinogroundItem:
    id: int
    scenes: tuple[Scene, Scene]
    captions: tuple[str, str]
    kind: str  # a key of KINDS

    def image_id(self, k: int) -> str:
        return f"wg-{self.id:06d}-{k}"

    def to_json(self) -> dict:
        collapsed_tag, tag = KINDS[self.kind]
        return {
            "id": self.id,
            "caption_0": self.captions[0],
            "caption_1": self.captions[1],
            "image_0": self.image_id(0),
            "image_1": self.image_id(1),
            "num_main_preds": 1,
            "collapsed_tag": collapsed_tag,
            "tag": tag,
        }


def winoground_items(n: int, rng: random.Random) -> list[WinogroundItem]:
    """`n` distinct items, attribute changes and binding swaps in turn; caption_k is true of scenes[k] only."""
    items: list[WinogroundItem] = []
    seen: set[tuple[str, str]] = set()
    relational = tuple(t for t in PAIR_TEMPLATES if t != "and")  # "… and …" fits both scenes of a swap
    n_attribute = round(ATTRIBUTE_SHARE * n)
    while len(items) < n:
        k = len(items)
        if k < n_attribute:
            kind = f"change-{list(CHANGES)[k % len(CHANGES)]}"
            scene = Scene((random_group(rng, 4),))
            other = change(scene, kind.removeprefix("change-"), rng)
            style = replace(random_style(rng), with_size=True)  # the size word must be there to differ
        else:
            kind = f"swap-{list(SWAPS)[k % len(SWAPS)]}"
            count = rng.choice((1, 1, 1, 2))  # equal counts keep the plurals the same in both captions
            a, b = (replace(random_group(rng, 1), count=count) for _ in range(2))
            scene = Scene((a, b), rng.choice(RELATIONS))
            style = random_style(rng, relational)
            other = swap(scene, kind.removeprefix("swap-"))
        captions = (caption(scene, style), caption(other, style))
        if other == scene or captions[0] == captions[1] or captions in seen:
            continue
        seen.add(captions)
        items.append(WinogroundItem(len(items), (scene, other), captions, kind))
    return items


# VQA
@dataclass(frozen=True)
class VqaItem:
    id: int
    scene: Scene  # one group
    question: str
    answer: str

    @property
    def image_id(self) -> str:
        return f"vqa-{self.id:06d}"

    def to_json(self) -> dict:
        """A line of BabyLM's vqa_filtered: the target answer and 7 distractors."""
        return {
            "question": self.question,
            "target_ans": self.answer,
            "distractors": [c for c in COLOURS if c != self.answer],
            "image_id": self.image_id,
            "question_id": f"vqa-q{self.id:06d}",
        }


def vqa_items(n: int, rng: random.Random) -> list[VqaItem]:
    """`n` colour questions about one-group scenes, each colour the answer equally often."""
    items = []
    for k in range(n):
        group = replace(random_group(rng, 4), colour=COLOURS[k % len(COLOURS)])
        items.append(VqaItem(k, Scene((group,)), " ".join(group_colour_question(group)), group.colour))
    return items
