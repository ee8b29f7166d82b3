"""The `capitals` task: name the capital city of a country (world knowledge, one short answer).

The bundled tasks of `math`, `code` and `dialogue` are sized for the tiny byte-level models; real
pretrained models like SmolLM2-135M-Instruct fail most of them but know many capitals, so this is
the task on which a real teacher does clearly better than chance (chance is near 0: the answer is
open). A completion is correct when the first capital city of the task's table that it names (as
a whole word) is the right one, so echoing the question or listing every capital does not pass.
Countries whose name is their capital's (Mexico, Panama, ...) are left out for the same reason.

    >>> from hpd.apps.tasks import get_task
    >>> task = get_task("capitals")
    >>> item = task.generate("test", 1, seed=0)[0]
    >>> item.prompt, item.answer  # doctest: +SKIP
    ('What is the capital of Kenya?', 'Nairobi')
    >>> task.verify(item, f"The capital is {item.answer}.")
    True
    >>> task.verify(item, "I am not sure, maybe Paris or " + item.answer)
    False
"""

from __future__ import annotations

import random
import re
from typing import Any

from hpd.apps.tasks.base import Task, TaskItem

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

TEMPLATES: tuple[str, ...] = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "What city is the capital of {c}?",
)


def _pattern(city: str) -> re.Pattern[str]:
    names = (city, *ALIASES.get(city, ()))
    return re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)


_PATTERNS: dict[str, re.Pattern[str]] = {city: _pattern(city) for city in CAPITALS.values()}


def first_capital(text: str) -> str | None:
    """The capital of the table that `text` names first, or None."""
    best: tuple[int, str] | None = None
    for city, pattern in _PATTERNS.items():
        m = pattern.search(text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), city)
    return best[1] if best else None


class CapitalsTask(Task):
    """Capital cities of ~100 countries, asked in a few phrasings (the split is by prompt)."""

    name = "capitals"
    max_new_tokens = 24
    val_fraction = 0.0  # a small prompt space (the world's countries): no validation split

    @property
    def params(self) -> dict[str, Any]:
        return {}

    def sample(self, rng: random.Random) -> TaskItem:
        country = rng.choice(sorted(CAPITALS))
        city = CAPITALS[country]
        prompt = rng.choice(TEMPLATES).format(c=country)
        name = country[4:] if country.startswith("the ") else country
        return TaskItem(prompt, f"The capital of {country} is {city}.", city,
                        {"task": self.name, "country": name, "capital": city})

    def verify(self, item: TaskItem, completion: str) -> bool:
        return first_capital(completion) == item.meta["capital"]
