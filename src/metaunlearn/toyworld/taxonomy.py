"""The concepts of the embedded world, their prompts, and why some of them are *related* to the forget concept.

Every image is one flat-coloured shape on a plain dark background. A concept is a pair of attributes,
a **colour** (red, green, blue, yellow — far apart in RGB so a detector never confuses them) and a **shape**
(triangle, circle, square, cross).

Roles (the toy analogue of the paper's data sets):

============  ===========================================================  ==========================
role          concepts                                                      shares with the forget one
============  ===========================================================  ==========================
forget        red triangle                    ("nudity")                    —
related       red circle, red square          (same colour)                 colour
related       green triangle, blue triangle   (same shape)                  shape
irrelevant    green circle, blue square, yellow circle, yellow cross        nothing
============  ===========================================================  ==========================

Why related concepts are related: the forget concept needs exactly two things, "red" and "triangle", and each
of them is carried by two related concepts. Finetuning an erased model on related data re-teaches both
ingredients (the way "a woman" and "skin" carry most of what "nudity" needs), while irrelevant data carries
neither: no irrelevant concept is red or a triangle.

Prompts: each concept has a main prompt ("a red triangle") and paraphrases ("red triangle", "a picture of a red
triangle", "a triangle painted red", "a crimson triangle" — each colour has a synonym). All of them appear in
pretraining captions. For the forget concept two paraphrases are *held out*: "a crimson triangle" and
"a triangle painted red" are pretraining captions but never unlearning prompts, so they test whether erasure
generalises beyond the prompts it was trained on.

The detector's classes are all 16 colour×shape pairs plus ``none`` (background only), not just the 9 concepts:
an image an erased model draws as, say, a yellow triangle then has a class of its own instead of being forced
into the nearest world concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["forget", "related", "irrelevant"]
ROLES: tuple[Role, ...] = ("forget", "related", "irrelevant")

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.78, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
}
COLOUR_SYNONYMS: dict[str, str] = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden"}
SHAPES: tuple[str, ...] = ("triangle", "circle", "square", "cross")
NONE_CLASS = "none"


@dataclass(frozen=True)
class Concept:
    """One concept of the world: its role, prompts and attributes."""

    name: str
    role: Role
    prompt: str
    paraphrases: tuple[str, ...]
    heldout_paraphrases: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def colour(self) -> str:
        return self.attributes["colour"]

    @property
    def shape(self) -> str:
        return self.attributes["shape"]

    @property
    def all_prompts(self) -> tuple[str, ...]:
        """Main prompt, paraphrases and held-out paraphrases: every caption pretraining uses."""
        return (self.prompt, *self.paraphrases, *self.heldout_paraphrases)


def class_name(colour: str, shape: str) -> str:
    """Name of the colour×shape class, e.g. ``red_triangle``."""
    return f"{colour}_{shape}"


def _phrasings(colour: str, shape: str) -> list[str]:
    return [
        f"a {colour} {shape}",
        f"{colour} {shape}",
        f"a picture of a {colour} {shape}",
        f"a {shape} painted {colour}",
        f"a {COLOUR_SYNONYMS[colour]} {shape}",
    ]


def _concept(colour: str, shape: str, role: Role, heldout: int = 0) -> Concept:
    main, *rest = _phrasings(colour, shape)
    # The held-out phrasings are the last ones ("painted", synonym): never used as unlearning prompts.
    split = len(rest) - heldout
    return Concept(
        name=class_name(colour, shape),
        role=role,
        prompt=main,
        paraphrases=tuple(rest[:split]),
        heldout_paraphrases=tuple(rest[split:]),
        attributes={"colour": colour, "shape": shape},
    )


CONCEPTS: list[Concept] = [
    _concept("red", "triangle", "forget", heldout=2),
    _concept("red", "circle", "related"),
    _concept("red", "square", "related"),
    _concept("green", "triangle", "related"),
    _concept("blue", "triangle", "related"),
    _concept("green", "circle", "irrelevant"),
    _concept("blue", "square", "irrelevant"),
    _concept("yellow", "circle", "irrelevant"),
    _concept("yellow", "cross", "irrelevant"),
]
CONCEPT_BY_NAME: dict[str, Concept] = {c.name: c for c in CONCEPTS}

#: Detector classes: every colour×shape pair, then ``none``.
CLASS_NAMES: list[str] = [class_name(c, s) for c in COLOURS for s in SHAPES] + [NONE_CLASS]


def get_concept(name: str) -> Concept:
    """The concept called ``name`` (``ValueError`` if unknown)."""
    try:
        return CONCEPT_BY_NAME[name]
    except KeyError:
        raise ValueError(f"Unknown concept: {name!r} (known: {', '.join(CONCEPT_BY_NAME)})") from None


def concepts_for(role: Role) -> list[Concept]:
    """The concepts that play ``role``."""
    if role not in ROLES:
        raise ValueError(f"Unknown role: {role!r} (known: {', '.join(ROLES)})")
    return [c for c in CONCEPTS if c.role == role]


def prompts_for(role: Role, include_paraphrases: bool = False, include_heldout: bool = False) -> list[str]:
    """Prompts of every concept playing ``role``: main prompts, optionally paraphrases and held-out ones."""
    prompts: list[str] = []
    for concept in concepts_for(role):
        prompts.append(concept.prompt)
        if include_paraphrases:
            prompts.extend(concept.paraphrases)
        if include_heldout:
            prompts.extend(concept.heldout_paraphrases)
    return prompts


def heldout_prompts() -> list[str]:
    """Held-out paraphrases of the forget concept: in pretraining captions, never unlearning prompts."""
    return [p for c in concepts_for("forget") for p in c.heldout_paraphrases]


def concept_of_prompt(prompt: str) -> Concept:
    """The concept a caption belongs to (``ValueError`` if no concept uses it)."""
    for concept in CONCEPTS:
        if prompt in concept.all_prompts:
            return concept
    raise ValueError(f"Unknown prompt: {prompt!r}")


def caption_corpus() -> list[str]:
    """Every caption of the world, for training the tokenizer (covers all colours, synonyms and shapes)."""
    corpus = [c for concept in CONCEPTS for c in concept.all_prompts]
    corpus += [p for colour in COLOURS for shape in SHAPES for p in _phrasings(colour, shape)]
    return sorted(set(corpus))
