"""The `capitals` task: name the capital city of a country (world knowledge, one short answer).

The bundled tasks of `math`, `code` and `dialogue` are sized for the tiny byte-level models; real
pretrained models like SmolLM2-135M-Instruct fail most of them but know many capitals, so this is
the task on which a real teacher does clearly better than chance (chance is near 0: the answer is
open). A completion is correct when the first capital city of the task's table that it names (as
a whole word) is the right one, so echoing the question or listing every capital does not pass.
Countries whose name is their capital's (Mexico, Panama, ...) are left out for the same reason.

The split is by COUNTRY, not by prompt: a country is held out (`test`) or not by a hash of its
name (`country_split`), and every phrasing of a question about it goes with it, so a model trained
on `train` questions has never been asked about a `test` country in any wording (about a fifth of
the countries: `countries("test")`). `questions(country)` gives its question in each of the
`TEMPLATES` phrasings.

    >>> from hpd.apps.tasks import get_task
    >>> task = get_task("capitals")
    >>> item = task.generate("test", 1, seed=0)[0]
    >>> item.prompt, item.answer  # doctest: +SKIP
    ('What is the capital of Cuba?', 'Havana')
    >>> country_split(item.meta["country"])
    'test'
    >>> task.verify(item, f"The capital is {item.answer}.")
    True
    >>> task.verify(item, "I am not sure, maybe Paris or " + item.answer)
    False
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any

from hpd.errors import HPDError
from hpd.apps.tasks.base import Task, TaskItem, split_of

# country -> capital (single, unambiguous official capitals; names as commonly written in English)
CAPITALS: dict[str, str] = {
    "Afghanistan": "Kabul", "Albania": "Tirana", "Algeria": "Algiers", "Angola": "Luanda",
    "Argentina": "Buenos Aires", "Armenia": "Yerevan", "Australia": "Canberra", "Austria": "Vienna",
    "Azerbaijan": "Baku", "Bangladesh": "Dhaka", "Belarus": "Minsk", "Belgium": "Brussels",
    "Bulgaria": "Sofia", "Cambodia": "Phnom Penh", "Cameroon": "Yaounde", "Canada": "Ottawa",
    "Chile": "Santiago", "China": "Beijing", "Colombia": "Bogota", "Croatia": "Zagreb",
    "Cuba": "Havana", "Czech Republic": "Prague", "Denmark": "Copenhagen", "Ecuador": "Quito",
    "Egypt": "Cairo", "Estonia": "Tallinn", "Ethiopia": "Addis Ababa", "Finland": "Helsinki",
    "France": "Paris", "Georgia": "Tbilisi", "Germany": "Berlin", "Ghana": "Accra",
    "Greece": "Athens", "Hungary": "Budapest", "Iceland": "Reykjavik", "India": "New Delhi",
    "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin",
    "Israel": "Jerusalem", "Italy": "Rome", "Jamaica": "Kingston", "Japan": "Tokyo",
    "Jordan": "Amman", "Kazakhstan": "Astana", "Kenya": "Nairobi", "Latvia": "Riga",
    "Lebanon": "Beirut", "Libya": "Tripoli", "Lithuania": "Vilnius", "Madagascar": "Antananarivo",
    "Malaysia": "Kuala Lumpur", "Mali": "Bamako", "Mongolia": "Ulaanbaatar", "Morocco": "Rabat",
    "Mozambique": "Maputo", "Nepal": "Kathmandu", "the Netherlands": "Amsterdam",
    "New Zealand": "Wellington", "Nigeria": "Abuja", "North Korea": "Pyongyang", "Norway": "Oslo",
    "Pakistan": "Islamabad", "Peru": "Lima", "the Philippines": "Manila", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Qatar": "Doha", "Romania": "Bucharest", "Russia": "Moscow",
    "Saudi Arabia": "Riyadh", "Senegal": "Dakar", "Serbia": "Belgrade", "Slovakia": "Bratislava",
    "Slovenia": "Ljubljana", "Somalia": "Mogadishu", "South Korea": "Seoul", "Spain": "Madrid",
    "Sudan": "Khartoum", "Sweden": "Stockholm", "Switzerland": "Bern", "Syria": "Damascus",
    "Taiwan": "Taipei", "Tanzania": "Dodoma", "Thailand": "Bangkok", "Tunisia": "Tunis",
    "Turkey": "Ankara", "Uganda": "Kampala", "Ukraine": "Kyiv", "the United Kingdom": "London",
    "the United States": "Washington", "Uruguay": "Montevideo", "Uzbekistan": "Tashkent",
    "Venezuela": "Caracas", "Vietnam": "Hanoi", "Zambia": "Lusaka", "Zimbabwe": "Harare",
}

# Spellings accepted for a capital besides its table name.
ALIASES: dict[str, tuple[str, ...]] = {
    "Kyiv": ("Kiev",), "Bogota": ("Bogotá",), "Yaounde": ("Yaoundé",), "Reykjavik": ("Reykjavík",),
    "Washington": ("Washington, D.C.", "Washington DC"), "Beijing": ("Peking",),
}

# The phrasings of a question ({c}: the country as in the table). None names a capital city, and
# none starts with the country (whose table name may start with a lower-case "the").
TEMPLATES: tuple[str, ...] = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "What city is the capital of {c}?",
    "What's the capital city of {c}?",
    "Tell me the capital of {c}.",
    "Do you know the capital of {c}?",
    "Which city serves as the capital of {c}?",
    "Capital of {c}?",
    "Quick geography question: what is the capital of {c}?",
    "I'm curious: which city is the capital of {c}?",
    "In a few words, what is the capital of {c}?",
)


def _pattern(city: str) -> re.Pattern[str]:
    names = (city, *ALIASES.get(city, ()))
    return re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


_PATTERNS: dict[str, re.Pattern[str]] = {city: _pattern(city) for city in CAPITALS.values()}


def country_name(country: str) -> str:
    """The country as a sentence names it mid-sentence, without a leading "the" ("Netherlands")."""
    return country[4:] if country.startswith("the ") else country


def country_split(country: str) -> str:
    """"test" (held out) or "train": a hash of the country's name (`split_of`, no `val` split).

    `country` is a key of `CAPITALS` or the same without its leading "the".
    """
    table = country if country in CAPITALS else f"the {country}"
    if table not in CAPITALS:
        raise HPDError(f"capitals: unknown country {country!r}: use a key of hpd.apps.tasks.capitals.CAPITALS")
    return split_of(table, val_fraction=0.0)


def countries(split: str) -> list[str]:
    """The countries (keys of `CAPITALS`, sorted) whose questions belong to `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise HPDError(f"capitals has the splits train and test (no val), not {split!r}")
    return [c for c in sorted(CAPITALS) if country_split(c) == split]


@functools.cache
def _split_names(split: str) -> re.Pattern[str]:
    names = {n for c in countries(split) for n in (country_name(c), CAPITALS[c], *ALIASES.get(CAPITALS[c], ()))}
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n)))
    return re.compile(r"\b(?:" + alternatives + r")\b", re.IGNORECASE)


def mentions(text: str, split: str = "test") -> str | None:
    """The first country of `split`, or capital of one, that `text` names (a whole word, any case), or None.

    What keeps held-out countries out of training data: `mentions(row_text)` is None for every row.
    Conservative: "turkey" the bird counts too.
    """
    m = _split_names(split).search(text)
    return m.group(0) if m else None


def questions(country: str) -> list[TaskItem]:
    """The question about `country` (a key of `CAPITALS`) in every phrasing of `TEMPLATES`, in order."""
    if country not in CAPITALS:
        raise HPDError(f"capitals: unknown country {country!r}: use a key of hpd.apps.tasks.capitals.CAPITALS")
    city = CAPITALS[country]
    meta = {"task": CapitalsTask.name, "country": country_name(country), "capital": city}
    return [TaskItem(t.format(c=country), f"The capital of {country} is {city}.", city, dict(meta))
            for t in TEMPLATES]


def first_capital(text: str) -> str | None:
    """The capital of the table that `text` names first, or None."""
    best: tuple[int, str] | None = None
    for city, pattern in _PATTERNS.items():
        m = pattern.search(text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), city)
    return best[1] if best else None


class CapitalsTask(Task):
    """Capital cities of ~100 countries, asked in a dozen phrasings (the split is by country)."""

    name = "capitals"
    max_new_tokens = 24
    val_fraction = 0.0  # a small prompt space (the world's countries): no validation split

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def sample(self, rng: random.Random) -> TaskItem:
        country = rng.choice(sorted(CAPITALS))
        return rng.choice(questions(country))

    def split_of_item(self, item: TaskItem) -> str:
        # By country, so that every phrasing of a question lands in the same split.
        return country_split(item.meta["country"])

    def verify(self, item: TaskItem, completion: str) -> bool:
        return first_capital(completion) == item.meta["capital"]
