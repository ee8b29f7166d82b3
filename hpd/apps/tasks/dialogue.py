"""The `dialogue` task: short instructions whose constraints a checker verifies.

Kinds: repeat a word N times with commas, reverse a word, write a phrase in capitals, sort words,
count letters, join two words with a separator, give the first letters of words, and greet
someone. Each kind has its own checker: where the instruction admits several answers the checker
tests the constraint ("apple,apple" and "apple, apple" both repeat; any greeting that names the
person is a greeting), otherwise it compares normalized text (surrounding space, quotes and a
final period ignored).

    >>> from hpd.apps.tasks.dialogue import DialogueTask
    >>> task = DialogueTask(kinds=["repeat"])
    >>> item = task.generate("train", 1, seed=0)[0]
    >>> item.prompt, item.reference  # doctest: +SKIP
    ("Repeat 'stone' 3 times, separated by commas.", 'stone, stone, stone')
    >>> task.verify(item, item.reference.replace(" ", ""))
    True
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from hpd.errors import HPDError
from hpd.apps.tasks.base import Task, TaskItem

KINDS: tuple[str, ...] = (
    "repeat", "reverse", "upper", "sort", "count", "join", "initials", "greet",
)

WORDS: tuple[str, ...] = tuple(
    """
    apple baker bread brick cake camel candy chair chalk cheese cloud coast coin corn cotton
    crane crown dance desk diver dog dream drum eagle earth field flame flute forest fox frost
    garden ghost glass goat grape grass green hammer heart honey horse house ice island jacket
    jelly kettle king kite lamp lemon light lion river mango maple market melon milk mirror
    monkey moon mouse music night ocean olive onion orange otter owl paint panda paper peach
    pearl pencil pepper piano pilot plane plant plum pony queen rabbit rain robot rocket rose
    salt sand school shell ship silver snake snow sock spoon star stone storm sugar sun table
    tiger toast tomato tower train tree tulip turtle violin wagon water whale wind window wolf
    yarn zebra
    """.split()
)
NAMES: tuple[str, ...] = tuple(
    """
    Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam
    Tara Umar Vera Will Yara Zoe Amir Bella Chen Dana Eli Finn
    """.split()
)
GREETINGS: tuple[str, ...] = ("hello", "hi", "hey", "greetings", "good morning", "welcome")
SEPARATORS: tuple[str, ...] = ("-", "_", "+", "/", ":")


def normalize(text: str) -> str:
    """Collapse whitespace, drop surrounding quotes and one final period."""
    text = " ".join(text.split())
    text = text.strip().strip("'\"`").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.strip("'\"`").strip()


class DialogueTask(Task):
    """Instruction following with verifiable constraints; `kinds` picks the instruction kinds."""

    name = "dialogue"
    max_new_tokens = 64

    def __init__(self, kinds: Sequence[str] | str = KINDS) -> None:
        if isinstance(kinds, str):  # "repeat+sort" from a command line
            kinds = [k for k in kinds.replace(",", "+").split("+") if k]
        bad = sorted(set(kinds) - set(KINDS))
        if bad or not kinds:
            raise HPDError(f"dialogue: unknown kinds {bad or kinds!r}: choose from {list(KINDS)}")
        self.kinds = tuple(k for k in KINDS if k in kinds)

    @property
    def params(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds)}

    def sample(self, rng: random.Random) -> TaskItem:
        kind = rng.choice(self.kinds)
        data: dict[str, Any] = {"kind": kind}
        if kind == "repeat":
            w, k = rng.choice(WORDS), rng.randint(2, 5)
            prompt = f"Repeat '{w}' {k} times, separated by commas."
            ref = ", ".join([w] * k)
            data.update(word=w, times=k)
        elif kind == "reverse":
            w = rng.choice(WORDS)
            prompt, ref = f"Reverse the letters of '{w}'.", w[::-1]
        elif kind == "upper":
            phrase = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
            prompt, ref = f"Write '{phrase}' in capital letters.", phrase.upper()
        elif kind == "sort":
            words = rng.sample(WORDS, rng.randint(3, 4))
            while words == sorted(words):  # an already sorted list asks for nothing
                rng.shuffle(words)
            prompt = f"Sort alphabetically: {', '.join(words)}."
            ref = ", ".join(sorted(words))
            data.update(words=sorted(words))
        elif kind == "count":
            w = rng.choice(WORDS)
            if rng.random() < 0.5:
                prompt, ref = f"How many letters are in '{w}'?", str(len(w))
            else:
                # Mostly letters of the word, sometimes one it lacks (answer 0).
                pool = sorted(set(w)) if rng.random() < 0.8 else sorted(set("aeiourst") - set(w))
                c = rng.choice(pool or sorted(set(w)))
                prompt, ref = f"How many times does '{c}' appear in '{w}'?", str(w.count(c))
            data.update(count=int(ref))
        elif kind == "join":
            a, b = rng.sample(WORDS, 2)
            sep = rng.choice(SEPARATORS)
            prompt, ref = f"Join '{a}' and '{b}' with '{sep}'.", f"{a}{sep}{b}"
        elif kind == "initials":
            words = rng.sample(WORDS, rng.randint(3, 4))
            prompt = f"Give the first letter of each word: {' '.join(words)}."
            ref = "".join(w[0] for w in words)
            data.update(letters=ref)
        else:  # greet
            name = rng.choice(NAMES)
            prompt, ref = f"Greet {name}.", f"Hello, {name}!"
            data.update(name=name)
        return TaskItem(prompt, ref, ref, {"task": self.name, **data})

    def verify(self, item: TaskItem, completion: str) -> bool:
        kind = item.meta.get("kind")
        text = normalize(completion)
        if not text:
            return False
        if kind == "repeat":
            parts = [normalize(p).lower() for p in completion.split(",")]
            return parts == [item.meta["word"].lower()] * int(item.meta["times"])
        if kind == "sort":
            # Any separator will do; the words and their order must be exactly right.
            return re.findall(r"[a-z]+", text.lower()) == list(item.meta["words"])
        if kind == "count":
            numbers = re.findall(r"-?\d+", text)
            return len(numbers) == 1 and int(numbers[0]) == int(item.meta["count"])
        if kind == "initials":
            letters = re.findall(r"[a-z]+", text.lower())
            return "".join(letters) == item.meta["letters"]
        if kind == "greet":
            low = text.lower()
            named = re.search(rf"\b{re.escape(item.meta['name'].lower())}\b", low) is not None
            return named and any(re.search(rf"\b{g}\b", low) for g in GREETINGS)
        if kind in ("reverse", "join"):
            return text.lower() == normalize(item.reference).lower()
        # upper (case is the point) and items without meta: exact after normalization.
        return text == normalize(item.reference)
