"""The data of the SmolLM2 knowledge recipe (benchmarks/smollm2_recipe.sh), built deterministically.

The student learns what the teacher says, on the shipped chat prompts and on capital-city
questions about the TRAINING countries of the `capitals` task (split by country,
`hpd.apps.tasks.capitals.country_split`); the held-out countries never appear in its data. Two
steps around the teacher's generations (`hpd generate`, cached on disk):

1. `write_prompts(out)` writes the prompts the teacher answers:
   - `prompts_chat_train.jsonl`: the `train` rows of `examples/chat_prompts.jsonl`,
   - `prompts_capitals_train.jsonl`: `per_country` phrasings (of the task's dozen) of the question
     about each training country, the phrasings drawn with a fixed seed,
   - `prompts_chat_heldout.jsonl`: the `heldout` chat rows (held-out KL and agreement);
   a chat prompt that names a held-out country or capital (`capitals.mentions`) is left out.
2. `write_train(out)` joins the teacher's answers to the two training prompt files
   (`teacher_chat_train.jsonl`, `teacher_capitals_train.jsonl`) into `train.jsonl`, in an order
   shuffled with a fixed seed, leaving out every row whose prompt or answer names a held-out
   country or capital (the teacher may name one in passing; the count is returned).

Same inputs, same bytes: a file whose text would not change is not rewritten (so `hpd generate`
and the teacher cache, keyed by content, are reused).

    >>> import tempfile
    >>> from hpd.apps.recipe_data import write_prompts
    >>> out = tempfile.mkdtemp()
    >>> counts = write_prompts(out, per_country=2)
    >>> counts["prompts_capitals_train"], counts["prompts_chat_heldout"]
    (150, 48)

From the shell: `python -m hpd.apps.recipe_data prompts --out DIR` and `... train --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from hpd.errors import HPDError
from hpd.files import atomic_write_text
from hpd.apps.tasks.capitals import TEMPLATES, countries, mentions, questions

CHAT_PROMPTS = "examples/chat_prompts.jsonl"
PER_COUNTRY = 6
TRAIN_SOURCES = ("teacher_chat_train.jsonl", "teacher_capitals_train.jsonl")


def _read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise HPDError(f"{p} not found: run the step that writes it first (see hpd.apps.recipe_data)")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise HPDError(f"{p} line {n} is not JSON ({e.msg}): rebuild the file") from None
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> int:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # leave an up-to-date file alone
        atomic_write_text(path, text)
    return len(rows)


def row_text(row: dict[str, Any]) -> str:
    """Every string a data row holds (prompt, chat messages, completion, other fields), newline-joined."""
    parts: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(row)
    return "\n".join(parts)


def capitals_prompts(per_country: int = PER_COUNTRY, seed: int = 0) -> list[dict[str, Any]]:
    """`per_country` phrasings of the question about each training country: `{"prompt", "country"}` rows.

    Countries in table order; each country's phrasings drawn from `TEMPLATES` with a string seed
    (stable across runs and machines), so a larger `per_country` adds phrasings, not other ones.
    """
    if not 1 <= per_country <= len(TEMPLATES):
        raise HPDError(f"per_country must be in [1, {len(TEMPLATES)}] (the task's phrasings), got {per_country}")
    rows = []
    for country in countries("train"):
        items = questions(country)
        order = list(range(len(items)))
        random.Random(f"hpd.recipe_data/capitals/{seed}/{country}").shuffle(order)
        rows += [{"prompt": items[i].prompt, "country": items[i].meta["country"]} for i in sorted(order[:per_country])]
    return rows


def write_prompts(out: str | os.PathLike, *, chat_prompts: str | os.PathLike = CHAT_PROMPTS,
                  per_country: int = PER_COUNTRY, seed: int = 0, chat_limit: int | None = None) -> dict[str, int]:
    """Write the three prompt files into `out`; returns the rows of each (and the chat rows left out).

    `chat_limit` keeps only the first that many chat prompts of each split (a smoke run).
    """
    out = Path(out)
    chat = _read_jsonl(chat_prompts)
    splits = {r.get("split") for r in chat}
    if not {"train", "heldout"} <= splits:
        raise HPDError(f"{chat_prompts}: rows need a 'split' of train or heldout (found {sorted(map(str, splits))})")
    kept = [r for r in chat if mentions(row_text(r)) is None]
    train, heldout = ([r for r in kept if r["split"] == s][:chat_limit] for s in ("train", "heldout"))
    return {
        "prompts_chat_train": _write_jsonl(out / "prompts_chat_train.jsonl", train),
        "prompts_capitals_train": _write_jsonl(out / "prompts_capitals_train.jsonl", capitals_prompts(per_country, seed)),
        "prompts_chat_heldout": _write_jsonl(out / "prompts_chat_heldout.jsonl", heldout),
        "chat_left_out": len(chat) - len(kept),
    }


def write_train(out: str | os.PathLike, *, seed: int = 0) -> dict[str, int]:
    """Join the teacher's answers into `out/train.jsonl`; returns rows kept and left out per source."""
    out = Path(out)
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for name in TRAIN_SOURCES:
        source = _read_jsonl(out / name)
        kept = [r for r in source if mentions(row_text(r)) is None]
        counts[name.removesuffix(".jsonl")] = len(kept)
        counts[name.removesuffix(".jsonl") + "_left_out"] = len(source) - len(kept)
        rows += kept
    random.Random(f"hpd.recipe_data/train/{seed}").shuffle(rows)
    counts["train"] = _write_jsonl(out / "train.jsonl", rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hpd.apps.recipe_data", description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("prompts", "train"), help="prompts: before `hpd generate`; train: after it")
    ap.add_argument("--out", required=True, help="the data directory")
    ap.add_argument("--chat-prompts", default=CHAT_PROMPTS)
    ap.add_argument("--per-country", type=int, default=PER_COUNTRY, help="phrasings per training country")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-limit", type=int, default=None, help="first N chat prompts of each split (smoke runs)")
    args = ap.parse_args(argv)
    try:
        if args.step == "prompts":
            counts = write_prompts(args.out, chat_prompts=args.chat_prompts, per_country=args.per_country,
                                   seed=args.seed, chat_limit=args.chat_limit)
        else:
            counts = write_train(args.out, seed=args.seed)
    except HPDError as e:  # the CLI's convention: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
