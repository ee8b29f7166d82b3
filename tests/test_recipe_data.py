"""The SmolLM2 recipe's data builder (`hpd.apps.recipe_data`): deterministic to the byte, and no
held-out country (or its capital) in anything it writes for training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hpd.apps.recipe_data import capitals_prompts, write_prompts, write_train
from hpd.apps.tasks.capitals import CAPITALS, TEMPLATES, countries, mentions
from hpd.data.rows import load_examples
from hpd.errors import HPDError

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "chat_prompts.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.jsonl"))}


def _fake_teacher(d: Path, answer) -> None:
    """What `hpd generate` writes: each prompt row plus its completion (chat rows: as a last turn)."""
    for kind in ("chat", "capitals"):
        out = []
        for i, row in enumerate(_rows(d / f"prompts_{kind}_train.jsonl")):
            text = answer(kind, i, row)
            if "messages" in row:
                row = {**row, "messages": row["messages"] + [{"role": "assistant", "content": text}]}
            out.append({**row, "completion": text})
        (d / f"teacher_{kind}_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))


def test_prompts_are_byte_identical_across_builds_and_name_no_held_out_country(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    counts = write_prompts(a, chat_prompts=CHAT, per_country=5)
    write_prompts(b, chat_prompts=CHAT, per_country=5)
    assert _files(a) == _files(b) and len(_files(a)) == 3
    assert counts == {"prompts_chat_train": 272, "prompts_capitals_train": 5 * len(countries("train")),
                      "prompts_chat_heldout": 48, "chat_left_out": 0}
    capitals = _rows(a / "prompts_capitals_train.jsonl")
    # every training country, each in 5 distinct phrasings; no held-out one anywhere
    assert Counter(r["country"] for r in capitals) == {c.removeprefix("the "): 5 for c in countries("train")}
    assert len({r["prompt"] for r in capitals}) == len(capitals)
    for name in ("prompts_chat_train.jsonl", "prompts_capitals_train.jsonl"):
        text = (a / name).read_text()
        assert mentions(text) is None, name
        assert not any(c.removeprefix("the ") in text for c in countries("test"))
    assert {r["split"] for r in _rows(a / "prompts_chat_heldout.jsonl")} == {"heldout"}
    # a smoke run's limit keeps the first chat prompts of each split, the same ones
    write_prompts(b, chat_prompts=CHAT, per_country=5, chat_limit=3)
    for name in ("prompts_chat_train.jsonl", "prompts_chat_heldout.jsonl"):
        assert (b / name).read_text().splitlines() == (a / name).read_text().splitlines()[:3]
    # a larger per_country adds phrasings to each country's, and another seed draws other ones
    more = {r["prompt"] for r in capitals_prompts(per_country=8)}
    assert {r["prompt"] for r in capitals} <= more
    assert capitals_prompts(per_country=5, seed=1) != capitals
    assert len(capitals_prompts(per_country=len(TEMPLATES))) == len(TEMPLATES) * len(countries("train"))
    with pytest.raises(HPDError, match="per_country"):
        capitals_prompts(per_country=0)


def test_a_chat_prompt_naming_a_held_out_country_is_left_out(tmp_path):
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": t}], "split": s} for t, s in (
        ("Tell me about tea.", "train"), ("Plan a trip to Cuba.", "train"), ("What do people eat in Havana?", "heldout"),
        ("Describe autumn.", "heldout"))]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = write_prompts(tmp_path / "d", chat_prompts=chat, per_country=1)
    assert counts["chat_left_out"] == 2
    assert [r["messages"][0]["content"] for r in _rows(tmp_path / "d" / "prompts_chat_train.jsonl")] == ["Tell me about tea."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(HPDError, match="split"):
        write_prompts(tmp_path / "e", chat_prompts=bad)


def test_training_file_is_deterministic_and_drops_answers_naming_a_held_out_country(tmp_path):
    held = sorted(CAPITALS[c] for c in countries("test"))

    def answer(kind, i, row):
        # the teacher names a held-out capital in passing in a few answers, as a real one may
        if i % 50 == 7:
            return f"Nothing like {held[i % len(held)]}, of course."
        return f"{kind} answer {i}"

    dirs = []
    for name in ("a", "b"):
        d = tmp_path / name
        write_prompts(d, chat_prompts=CHAT, per_country=2)
        _fake_teacher(d, answer)
        dirs.append((d, write_train(d)))
    (a, counts), (b, counts_b) = dirs
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes() and counts == counts_b
    n_chat, n_cap = 272, 2 * len(countries("train"))
    dropped_chat, dropped_cap = len(range(7, n_chat, 50)), len(range(7, n_cap, 50))
    assert counts == {"teacher_chat_train": n_chat - dropped_chat, "teacher_chat_train_left_out": dropped_chat,
                      "teacher_capitals_train": n_cap - dropped_cap, "teacher_capitals_train_left_out": dropped_cap,
                      "train": n_chat + n_cap - dropped_chat - dropped_cap}
    text = (a / "train.jsonl").read_text()
    assert mentions(text) is None and not any(h in text for h in held)
    rows = _rows(a / "train.jsonl")
    # both sources, shuffled together (not one block after the other), every kept row once
    kinds = [r["completion"].split()[0] for r in rows]
    assert set(kinds[:40]) == {"chat", "capitals"} and len(set(r["completion"] for r in rows)) == len(rows)
    examples, _ = load_examples(str(a / "train.jsonl"))  # loads as training data
    assert len(examples) == len(rows)
    # another seed: the same rows in another order; a rerun leaves the file untouched
    mtime = (a / "train.jsonl").stat().st_mtime_ns
    write_train(a)
    assert (a / "train.jsonl").stat().st_mtime_ns == mtime
    write_train(b, seed=1)
    other = (b / "train.jsonl").read_text()
    assert other != text and sorted(other.splitlines()) == sorted(text.splitlines())


def test_training_file_needs_the_teacher_answers(tmp_path):
    write_prompts(tmp_path, chat_prompts=CHAT, per_country=1)
    with pytest.raises(HPDError, match="teacher_chat_train.jsonl not found"):
        write_train(tmp_path)
