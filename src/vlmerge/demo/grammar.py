"""Lexicon and an English-like grammar with number and gender agreement.

Sentences are lowercase except names and end with " ." (or " ?"). Agreement phenomena:
determiner–noun number (this/these, a/some, one/two…), subject–verb number (runs/run,
is/are, has/have, does/do) across prepositional phrases and relative clauses (attractors),
conjoined subjects, and reflexives (himself/herself/itself/themselves). Noun phrases nest
at most `max_depth` levels deep.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

VOWELS = "aeiou"
REFLEXIVES = {"m": "himself", "f": "herself", "n": "itself"}
PLURAL_REFLEXIVE = "themselves"
PREPOSITIONS = ("near", "behind", "under", "beside", "with", "above", "below")
SINGULAR_DETERMINERS = {"the": 9, "a": 5, "this": 2, "that": 2, "one": 1, "every": 1, "each": 1}
PLURAL_DETERMINERS = {"the": 9, "some": 3, "these": 2, "those": 2, "two": 2, "three": 1, "four": 1, "many": 1}
ADJECTIVE_ORDER = ("size", "mood", "colour")
# Word classes that are never held out: the caption vocabulary and the clause-taking verbs.
NEVER_HELD_OUT = frozenset({"shape", "colour", "size", "clausal"})
HOLD_OUT_FRACTION = 0.2
COLOUR_EXCHANGE_SHARE = 0.03  # of the corpus's lines: "what colour is the ball ? red ."
# The caption vocabulary (see images.py), also used in the text corpus.
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown")
SIZES = ("small", "big", "tiny", "huge", "tall")


def colour_question(noun: str, plural: bool) -> list[str]:
    """ "what colour is the ball ?" / "what colour are the balls ?" (the demo VQA's questions too)."""
    return ["what", "colour", "are" if plural else "is", "the", noun, "?"]


def add_s(word: str) -> str:
    """The regular -s form of a noun (plural) or verb (third person singular)."""
    if word.endswith(("s", "x", "z", "ch", "sh")) or (word.endswith("o") and word[-2] not in VOWELS):
        return word + "es"
    if word.endswith("y") and word[-2] not in VOWELS:
        return word[:-1] + "ies"
    return word + "s"


@dataclass(frozen=True)
class Noun:
    singular: str
    plural: str
    kind: str  # "animal", "person", "thing" or "shape"
    gender: str | None = None  # "m", "f", "n" (itself), or None: no singular reflexive

    @property
    def animate(self) -> bool:
        return self.kind not in ("thing", "shape")

    @property
    def irregular(self) -> bool:
        return self.plural != add_s(self.singular)

    def form(self, plural: bool) -> str:
        return self.plural if plural else self.singular


@dataclass(frozen=True)
class Verb:
    base: str
    kind: str  # "intransitive", "transitive" or "clausal"
    animate_object: bool = False

    def form(self, plural: bool) -> str:
        """Present tense agreeing with a third-person subject."""
        return self.base if plural else add_s(self.base)


@dataclass(frozen=True)
class Adjective:
    word: str
    kind: str  # "colour", "size" or "mood" (moods describe animate nouns only)


@dataclass(frozen=True)
class Name:
    word: str
    gender: str


@dataclass(frozen=True)
class Lexicon:
    nouns: tuple[Noun, ...]
    verbs: tuple[Verb, ...]
    adjectives: tuple[Adjective, ...]
    names: tuple[Name, ...]

    def words(self) -> set[str]:
        """Every surface form: both numbers of nouns and verbs, adjectives, names."""
        return (
            {n.singular for n in self.nouns}
            | {n.plural for n in self.nouns}
            | {v.form(p) for v in self.verbs for p in (False, True)}
            | {a.word for a in self.adjectives}
            | {n.word for n in self.names}
        )

    def to_json(self) -> dict[str, list]:
        return {
            "nouns": [[n.singular, n.plural] for n in self.nouns],
            "verbs": [[v.base, v.form(False)] for v in self.verbs],
            "adjectives": [a.word for a in self.adjectives],
            "names": [n.word for n in self.names],
        }


def _nouns(kind: str, words: Iterable[str], gender: str | None = None) -> list[Noun]:
    return [Noun(w, add_s(w), kind, gender) for w in words]


def full_lexicon() -> Lexicon:
    """The whole lexicon, before the train / held-out split."""
    nouns = [
        *_nouns(
            "animal",
            "dog cat bird horse cow pig duck frog rabbit bear fox lion tiger monkey owl "
            "snake goat lamb hen puppy kitten donkey zebra turtle".split(),
            "n",
        ),
        *(Noun(s, p, "animal", "n") for s, p in (
            ("mouse", "mice"), ("goose", "geese"), ("ox", "oxen"), ("wolf", "wolves"), ("calf", "calves"),
        )),
        *(Noun(s, p, "person", g) for s, p, g in (("man", "men", "m"), ("woman", "women", "f"), ("child", "children", None))),
        *_nouns("person", "boy king prince brother father uncle".split(), "m"),
        *_nouns("person", "girl queen princess sister mother aunt".split(), "f"),
        *_nouns("person", "farmer teacher doctor baker friend baby pilot nurse clown".split()),
        *_nouns(
            "thing",
            "ball box cup book hat tree car apple cake chair table house boat key shoe "
            "bell kite drum bottle bed flower cookie toy sock lamp bus".split(),
        ),
        *_nouns("shape", SHAPES),
    ]
    verbs = [
        *(Verb(w, "transitive", True) for w in "chase help love follow visit hug tickle greet feed".split()),
        *(Verb(w, "transitive") for w in "see like find watch push pull kick carry hold wash catch".split()),
        *(Verb(w, "intransitive") for w in "run sleep jump sing swim walk smile laugh dance play cry sit wait hide shout".split()),
        *(Verb(w, "clausal") for w in "think know say hope".split()),
    ]
    adjectives = [
        *(Adjective(w, "colour") for w in COLOURS),
        *(Adjective(w, "size") for w in SIZES),
        *(Adjective(w, "mood") for w in "happy sad hungry sleepy angry brave clever quiet funny busy shy kind".split()),
    ]
    names = [
        *(Name(w, "m") for w in "John Tom Peter Max Ben Leo Jack Paul".split()),
        *(Name(w, "f") for w in "Mary Anna Lucy Emma Sara Kate Lily Zoe".split()),
    ]
    return Lexicon(tuple(nouns), tuple(verbs), tuple(adjectives), tuple(names))


def _split(entries: Sequence, rng: random.Random, stratum: Callable = lambda e: e.kind) -> tuple[list, list]:
    """Hold out HOLD_OUT_FRACTION (at least one) of every stratum whose kind may be held out."""
    held: set = set()
    for key in dict.fromkeys(map(stratum, entries)):
        members = [e for e in entries if stratum(e) == key and e.kind not in NEVER_HELD_OUT]
        if members:
            held.update(rng.sample(members, max(1, round(HOLD_OUT_FRACTION * len(members)))))
    return [e for e in entries if e not in held], [e for e in entries if e in held]


def split_lexicon(lexicon: Lexicon, rng: random.Random) -> tuple[Lexicon, Lexicon]:
    """Split into (train, held_out). Held-out words never appear in the training text or captions.

    Nouns are split by kind and by regular/irregular plural, so both halves have irregular
    animal and person nouns.
    """
    train_nouns, held_nouns = _split(lexicon.nouns, rng, lambda n: (n.kind, n.irregular))
    train_verbs, held_verbs = _split(lexicon.verbs, rng)
    train_adjs, held_adjs = _split(lexicon.adjectives, rng)
    train = Lexicon(tuple(train_nouns), tuple(train_verbs), tuple(train_adjs), lexicon.names)
    held_out = Lexicon(tuple(held_nouns), tuple(held_verbs), tuple(held_adjs), ())
    return train, held_out


def with_articles(words: Sequence[str]) -> list[str]:
    """Turn "a" into "an" before a vowel."""
    return [
        "an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in VOWELS else w
        for i, w in enumerate(words)
    ]


@dataclass(frozen=True)
class Phrase:
    """A noun phrase with what agreement needs to know about it."""

    words: tuple[str, ...]
    plural: bool
    gender: str | None
    animate: bool

    @property
    def reflexive(self) -> str | None:
        """The reflexive pronoun this phrase binds, or None if no singular one fits."""
        return PLURAL_REFLEXIVE if self.plural else REFLEXIVES.get(self.gender or "")


def _number_pairs(lexicon: Lexicon) -> dict[str, str]:
    pairs = [("is", "are"), ("has", "have"), ("does", "do")]
    pairs += [(v.form(False), v.base) for v in lexicon.verbs]
    return {a: b for x, y in pairs for a, b in ((x, y), (y, x))}


class Grammar:
    """Samples sentences from a lexicon; every choice is drawn from `rng`."""

    def __init__(self, lexicon: Lexicon, rng: random.Random, *, max_depth: int = 2) -> None:
        self.lexicon = lexicon
        self.rng = rng
        self.max_depth = max_depth
        self._nouns = {
            None: lexicon.nouns,
            True: tuple(n for n in lexicon.nouns if n.animate),
            False: tuple(n for n in lexicon.nouns if not n.animate),
        }
        self._verbs = {k: tuple(v for v in lexicon.verbs if v.kind == k) for k in ("intransitive", "transitive", "clausal")}
        self._other_number = _number_pairs(lexicon)

    def other_number(self, verb_form: str) -> str:
        """The same verb agreeing with the other number (runs <-> run, is <-> are, …)."""
        return self._other_number[verb_form]

    # Words
    def determiner(self, plural: bool) -> str:
        table = PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS
        return self.rng.choices(list(table), weights=list(table.values()))[0]

    def adjectives(self, noun: Noun) -> list[str]:
        """Zero to two adjectives of different kinds that suit the noun, in English order."""
        suits = {"size": True, "mood": noun.animate, "colour": noun.kind != "person"}
        kinds = [k for k in ADJECTIVE_ORDER if suits[k]]
        n = self.rng.choices((0, 1, 2), weights=(55, 33, 12))[0]
        chosen = set(self.rng.sample(kinds, n))
        return [self.adjective(k) for k in ADJECTIVE_ORDER if k in chosen]

    def adjective(self, kind: str) -> str:
        return self.rng.choice([a.word for a in self.lexicon.adjectives if a.kind == kind])

    def predicative_adjective(self, animate: bool) -> str:
        return self.adjective(self.rng.choice(("size", "mood") if animate else ("size", "colour")))

    def transitive_verb(self, object_animate: bool) -> Verb:
        return self.rng.choice([v for v in self._verbs["transitive"] if object_animate or not v.animate_object])

    def verb(self, kind: str) -> Verb:
        return self.rng.choice(self._verbs[kind])

    # Noun phrases
    def noun_phrase(
        self,
        depth: int = 0,
        *,
        noun: Noun | None = None,
        plural: bool | None = None,
        animate: bool | None = None,
        determiner: str | None = None,
        modify: bool = True,
    ) -> Phrase:
        """Determiner, adjectives, noun, and sometimes a PP or relative clause (below max_depth)."""
        noun = noun or self.rng.choice(self._nouns[animate])
        plural = self.rng.random() < 0.4 if plural is None else plural
        words = (determiner or self.determiner(plural), *self.adjectives(noun), noun.form(plural))
        phrase = Phrase(words, plural, noun.gender, noun.animate)
        if modify and depth < self.max_depth and self.rng.random() < 0.25:
            modifier = self.prepositional_phrase(depth + 1) if self.rng.random() < 0.5 else self.relative_clause(phrase, depth + 1)
            phrase = replace(phrase, words=words + tuple(modifier))
        return phrase

    def argument(self, depth: int = 0, *, animate: bool | None = None) -> Phrase:
        """A name or a noun phrase, as subject or object."""
        if animate is not False and self.rng.random() < 0.15:
            name = self.rng.choice(self.lexicon.names)
            return Phrase((name.word,), False, name.gender, True)
        return self.noun_phrase(depth, animate=animate)

    def prepositional_phrase(self, depth: int, obj: Phrase | None = None) -> list[str]:
        obj = obj or self.noun_phrase(depth)
        return [self.rng.choice(PREPOSITIONS), *obj.words]

    def relative_clause(
        self, head: Phrase, depth: int, *, other: Phrase | None = None, object_gap: bool | None = None
    ) -> list[str]:
        """ "that the cats chase" (object gap) or "that chases the cats" (subject gap, animate head)."""
        if object_gap is None:
            object_gap = not head.animate or self.rng.random() < 0.5
        if object_gap:
            other = other or self.noun_phrase(depth, animate=True)
            return ["that", *other.words, self.transitive_verb(head.animate).form(other.plural)]
        other = other or self.noun_phrase(depth)
        return ["that", self.transitive_verb(other.animate).form(head.plural), *other.words]

    # Clauses
    def predicate(self, subject: Phrase, depth: int = 0) -> list[str]:
        """A verb phrase whose first word agrees in number with `subject`."""
        plural = subject.plural
        kinds = ["copula", "copula", "location", "have"]
        if subject.animate:
            kinds += ["intransitive"] * 3 + ["transitive"] * 4
            kinds += ["reflexive"] if subject.reflexive else []
            kinds += ["clausal"] if depth < self.max_depth else []
        kind = self.rng.choice(kinds)
        if kind == "intransitive":
            return [self.verb("intransitive").form(plural)]
        if kind == "transitive":
            obj = self.argument(depth)
            return [self.transitive_verb(obj.animate).form(plural), *obj.words]
        if kind == "reflexive":
            return [self.transitive_verb(True).form(plural), subject.reflexive]
        if kind == "clausal":
            return [self.verb("clausal").form(plural), "that", *self.clause(depth + 1)]
        if kind == "copula":
            return ["are" if plural else "is", self.predicative_adjective(subject.animate)]
        if kind == "location":
            return ["are" if plural else "is", *self.prepositional_phrase(depth)]
        return ["have" if plural else "has", *self.noun_phrase(depth).words]

    def clause(self, depth: int = 0) -> list[str]:
        """A declarative clause: plain, existential ("there are …") or with a conjoined subject."""
        r = self.rng.random()
        if r < 0.08:
            plural = self.rng.random() < 0.5
            det = self.rng.choice(("some", "two", "three", "many") if plural else ("a", "one"))
            np = self.noun_phrase(depth, plural=plural, determiner=det)
            return ["there", "are" if plural else "is", *np.words]
        if r < 0.16:
            a, b = self.argument(self.max_depth), self.argument(self.max_depth)
            subject = Phrase((*a.words, "and", *b.words), True, None, a.animate and b.animate)
        else:
            subject = self.argument(depth)
        return [*subject.words, *self.predicate(subject, depth)]

    def question(self) -> list[str]:
        """A yes/no question: "does the dog run ?", "are the boxes red ?"."""
        subject = self.argument(1)
        if subject.animate and self.rng.random() < 0.6:
            aux = "do" if subject.plural else "does"
            if self.rng.random() < 0.5:
                return [aux, *subject.words, self.verb("intransitive").base]
            obj = self.argument(1)
            return [aux, *subject.words, self.transitive_verb(obj.animate).base, *obj.words]
        return ["are" if subject.plural else "is", *subject.words, self.predicative_adjective(subject.animate)]

    def colour_exchange(self) -> list[str]:
        """A colour question and its one-word answer, "what colour is the ball ? red ." (no picture:
        the answer is any colour; it teaches the demo VQA's format, not its answers)."""
        noun = self.rng.choice([n for n in self.lexicon.nouns if n.kind != "person"])
        plural = self.rng.random() < 0.4
        return [*colour_question(noun.form(plural), plural), self.adjective("colour")]

    def sentence(self) -> str:
        r = self.rng.random()
        if r < COLOUR_EXCHANGE_SHARE:
            words = self.colour_exchange() + ["."]
        else:
            words = self.question() + ["?"] if r < 0.1 + COLOUR_EXCHANGE_SHARE else self.clause() + ["."]
        return " ".join(with_articles(words))


def sample_corpus(grammar: Grammar, n_words: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Sentences (one per line) until they hold at least `n_words` words, skipping `exclude`."""
    lines: list[str] = []
    words = 0
    while words < n_words:
        line = grammar.sentence()
        if line not in exclude:
            lines.append(line)
            words += len(line.split())
    return lines
