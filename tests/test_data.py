"""Tests for hpd.data: loading every format, row errors, encoding, shifted labels, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpd.data.order import EpochSampler
from hpd.data.rows import Example, LoadStats, load_examples
from hpd.data.collate import batch_for_generation, build_batch
from hpd.data.encode import encode_dataset, encode_example, encode_prompt
from hpd.errors import HPDError
from hpd.models.tokenizer import byte_tokenizer

ROWS = [
    {"prompt": "2+2=", "completion": "4", "reference": "four"},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    },
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _dataset(rows: list):
    """A `datasets.Dataset` with the union of the rows' columns (from_list looks at row 0 only)."""
    import datasets

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


def _as_tuples(examples: list[Example]) -> list[tuple]:
    # Columnar formats add the union of columns as None-valued extras; compare non-None ones.
    return [
        (ex.prompt, ex.completion, {k: v for k, v in ex.extra.items() if v is not None})
        for ex in examples
    ]


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def test_every_format_loads_the_same_examples(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps(ROWS, indent=2))
    json_lines = _write_jsonl(tmp_path / "lines.json", ROWS)
    parquet = tmp_path / "d.parquet"
    ds = _dataset(ROWS)
    ds.to_parquet(str(parquet))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))

    reference, stats = load_examples(str(jsonl))
    assert stats.rows == 3 and stats.skipped == 0
    want = _as_tuples(reference)
    assert want[0] == ("2+2=", "4", {"reference": "four"})
    for path in [json_list, json_lines, parquet, tmp_path / "saved", tmp_path / "dd"]:
        got, _ = load_examples(str(path))
        assert _as_tuples(got) == want, path
    # `dir:split` picks a split of a saved DatasetDict.
    got, _ = load_examples(f"{tmp_path / 'dd'}:test")
    assert _as_tuples(got) == want[:1]
    with pytest.raises(HPDError, match="no split 'dev'.*'train', 'test'"):
        load_examples(f"{tmp_path / 'dd'}:dev")


def test_sources_name_file_and_line_or_row(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    exs, _ = load_examples(str(jsonl))
    assert [e.source for e in exs] == [f"{jsonl}:2", f"{jsonl}:4"]  # blank lines skipped

    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps(ROWS, indent=2))
    exs, _ = load_examples(str(json_list))
    text = json_list.read_text().splitlines()
    for ex in exs:
        line = int(ex.source.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"  # the line where the element starts

    parquet = tmp_path / "d.parquet"
    _dataset(ROWS).to_parquet(str(parquet))
    exs, _ = load_examples(str(parquet))
    assert [e.source for e in exs] == [f"{parquet}[{i}]" for i in range(3)]


def test_messages_split_into_prompt_and_last_assistant_turn(tmp_path):
    exs, _ = load_examples(str(_write_jsonl(tmp_path / "m.jsonl", ROWS)))
    sys_user = exs[1]
    assert sys_user.prompt == ROWS[1]["messages"][:2]
    assert sys_user.completion == "hi"
    multi = exs[2]
    # Earlier assistant turns stay in the prompt; only the last one is the completion.
    assert [m["content"] for m in multi.prompt] == ["a", "b", "c"]
    assert multi.prompt[1]["role"] == "assistant"
    assert multi.completion == "d"


def test_custom_field_names_and_extra(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"q": "x?", "a": "y", "reference": "ref", "id": 7}])
    exs, _ = load_examples(str(path), prompt_field="q", completion_field="a")
    assert (exs[0].prompt, exs[0].completion) == ("x?", "y")
    assert exs[0].extra == {"reference": "ref", "id": 7}


GOOD = json.dumps({"prompt": "p", "completion": "c"})
BAD_ROWS = {
    "invalid_json": ('{"prompt": "p", "completion": ', "invalid JSON"),
    "not_object": ("[1, 2]", "expected a JSON object, got list"),
    "missing_completion": (
        json.dumps({"prompt": "p"}),
        "field 'completion' is missing (expected 'prompt' and 'completion', or 'messages')",
    ),
    "missing_prompt": (json.dumps({"completion": "c"}), "field 'prompt' is missing"),
    "empty_completion": (json.dumps({"prompt": "p", "completion": ""}), "'completion' is empty"),
    "empty_prompt": (json.dumps({"prompt": " ", "completion": "c"}), "'prompt' is empty"),
    "wrong_type": (json.dumps({"prompt": 3, "completion": "c"}), "'prompt' must be a string"),
    "completion_type": (
        json.dumps({"prompt": "p", "completion": {"x": 1}}),
        "'completion' must be a string, got dict",
    ),
    "no_final_assistant": (
        json.dumps({"messages": [{"role": "user", "content": "u"}]}),
        "must be an assistant turn",
    ),
    "assistant_only": (
        json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),
        "no message before the final assistant turn",
    ),
    "non_string_content": (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "u"}]},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "messages[0] (user) 'content' must be a string, got list",
    ),
    "messages_not_list": (json.dumps({"messages": "hello"}), "'messages' must be a list"),
    "message_not_object": (
        json.dumps({"messages": ["hi", {"role": "assistant", "content": "a"}]}),
        "messages[0] must be an object",
    ),
    "missing_role": (
        json.dumps({"messages": [{"content": "u"}, {"role": "assistant", "content": "a"}]}),
        "messages[0] needs a non-empty string 'role'",
    ),
    "empty_final_assistant": (
        json.dumps(
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]}
        ),
        "final assistant message of 'messages' is empty",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_error_names_file_line_and_problem(tmp_path, kind):
    line, reason = BAD_ROWS[kind]
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])  # bad row on line 3
    with pytest.raises(HPDError) as err:
        load_examples(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path} line 3: "), msg
    assert reason in msg
    assert "set data.on_bad_row=skip" in msg  # says how to get past it

    exs, stats = load_examples(str(path), on_bad_row="skip")
    assert len(exs) == 2 and stats.rows == 2
    assert stats.skipped == 1
    assert stats.skip_reasons[0].startswith(f"{path} line 3: ") and reason in stats.skip_reasons[0]


def test_bad_row_in_parquet_and_json_list(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": ["c", None]}), parquet)
    with pytest.raises(HPDError, match=r"bad\.parquet row index 1: field 'completion' is missing"):
        load_examples(str(parquet))

    json_list = tmp_path / "bad.json"
    json_list.write_text('[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": "p"}\n]\n')
    with pytest.raises(HPDError, match=r"bad\.json line 3: field 'completion' is missing"):
        load_examples(str(json_list))
    json_list.write_text('[\n  {"prompt": "p", "completion": "c"},\n  {"prompt": }\n]\n')
    with pytest.raises(HPDError, match=r"bad\.json line 3: invalid JSON"):
        load_examples(str(json_list))


def test_invalid_utf8_line_is_reported_and_skippable(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(HPDError, match=r"enc\.jsonl line 2: not valid UTF-8"):
        load_examples(str(path))
    exs, stats = load_examples(str(path), on_bad_row="skip")
    assert len(exs) == 1 and stats.skipped == 1


def test_skip_mode_keeps_first_reasons_only(tmp_path):
    lines = [GOOD] + ["not json"] * 8
    exs, stats = load_examples(str(_write_lines(tmp_path / "s.jsonl", lines)), on_bad_row="skip")
    assert len(exs) == 1
    assert stats.skipped == 8
    assert 1 <= len(stats.skip_reasons) < 8
    assert "line 2" in stats.skip_reasons[0]


def test_missing_file_and_no_usable_rows(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(HPDError, match=r"nope\.jsonl not found"):
        load_examples(str(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(HPDError, match=r"dataset .*empty\.jsonl has no usable rows"):
        load_examples(str(empty))
    all_bad = _write_lines(tmp_path / "allbad.jsonl", ["[]", "3"])
    with pytest.raises(HPDError, match=r"has no usable rows \(2 bad rows were skipped"):
        load_examples(str(all_bad), on_bad_row="skip")
    with pytest.raises(HPDError, match="don't know how to read"):
        load_examples(str(_write_lines(tmp_path / "x.csv", ["a,b"])))
    with pytest.raises(HPDError, match="on_bad_row must be"):
        load_examples(str(all_bad), on_bad_row="ignore")


def test_prompt_only_rows_when_completion_not_required(tmp_path):
    rows = [
        {"prompt": "p"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
        {"prompt": "q", "completion": "ref"},
    ]
    path = _write_jsonl(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(HPDError):
        load_examples(str(path))
    exs, _ = load_examples(str(path), require_completion=False)
    assert [e.completion for e in exs] == ["", "", "ref"]
    assert exs[1].prompt == rows[1]["messages"]


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------


def test_chat_prompt_ends_with_assistant_marker(tok):
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    user = tok.convert_tokens_to_ids("<|user|>")
    ids = encode_prompt("hello", tok)  # a str prompt becomes one user message
    assert ids[-1] == assistant
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert user in ids
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    ids = encode_prompt(msgs, tok, chat_template="on")
    assert tok.decode(ids) == "<|bos|><|system|>s<|end|><|user|>u<|end|><|assistant|>"


def test_plain_prompt_without_template(tok):
    assert encode_prompt("hi", tok, chat_template="none") == list(b"hi")
    plain = byte_tokenizer()
    plain.chat_template = None
    assert encode_prompt("hi", plain) == list(b"hi")  # auto falls back to plain text
    msgs = [{"role": "user", "content": "u"}]
    assert plain.decode(encode_prompt(msgs, plain)) == "user: u\nassistant: "
    with pytest.raises(HPDError, match="no chat template"):
        encode_prompt("hi", plain, chat_template="on")
    with pytest.raises(HPDError, match="chat_template must be one of"):
        encode_prompt("hi", tok, chat_template="yes")


def test_plain_prompt_gets_bos_once_when_tokenizer_adds_it():
    from tokenizers import processors

    t = byte_tokenizer()
    t.chat_template = None
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", t.bos_token_id)]
    )
    assert t("a")["input_ids"][0] == t.bos_token_id  # the stand-in really adds bos
    assert encode_prompt("hi", t) == [t.bos_token_id] + list(b"hi")


def test_completion_ends_with_eos_and_prompt_only_is_none(tok):
    enc = encode_example(Example("q", "ans", "s:1"), tok, max_length=64, chat_template="none")
    assert enc.completion_ids == list(b"ans") + [tok.eos_token_id]
    assert enc.prompt_ids == list(b"q") and not enc.truncated and enc.source == "s:1"
    assert encode_example(Example("q", "", "s:2"), tok, max_length=64) is None


def test_truncation_cuts_completion_end_then_prompt_start(tok):
    # Prompt fits: the completion loses its end (and its eos).
    enc = encode_example(Example("ab", "0123456789", "s"), tok, max_length=6, chat_template="none")
    assert enc.truncated
    assert enc.prompt_ids == list(b"ab") and enc.completion_ids == list(b"0123")
    # Prompt alone too long: its start goes, max_length // 4 completion tokens stay.
    long_prompt = "P" * 30 + "end"
    enc = encode_example(Example(long_prompt, "xyz", "s"), tok, max_length=16, chat_template="none")
    assert enc.truncated
    assert len(enc.prompt_ids) + len(enc.completion_ids) == 16
    assert enc.completion_ids == list(b"xyz") + [tok.eos_token_id]  # 4 = 16 // 4 tokens
    assert bytes(enc.prompt_ids).endswith(b"end")
    # Extreme: never an empty completion, never an empty prompt.
    enc = encode_example(Example(long_prompt, "xyz", "s"), tok, max_length=2, chat_template="none")
    assert len(enc.prompt_ids) == 1 and len(enc.completion_ids) == 1
    with pytest.raises(HPDError, match="max_length"):
        encode_example(Example("a", "b", "s"), tok, max_length=1)


def test_encode_dataset_counts_truncations_and_skips(tok):
    exs = [
        Example("p", "short", "a"),
        Example("p", "x" * 100, "b"),
        Example("p" * 100, "y", "c"),
        Example("p", "", "d"),  # prompt-only: dropped
    ]
    stats = LoadStats(rows=4)
    enc = encode_dataset(exs, tok, max_length=32, stats=stats)
    assert [e.source for e in enc] == ["a", "b", "c"]
    assert [e.truncated for e in enc] == [False, True, True]
    assert stats.truncated == 2 and stats.skipped == 1
    assert all(len(e.prompt_ids) + len(e.completion_ids) <= 32 for e in enc)
    assert all(len(e.completion_ids) >= 1 for e in enc)
    with pytest.raises(HPDError, match="no example has a completion"):
        encode_dataset([Example("p", "", "d")], tok, max_length=32)


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def test_labels_are_exactly_the_shifted_completion_tokens():
    prompts = [[1, 2, 3], [4], [5, 6]]
    completions = [[7, 8], [9, 10, 11, 12], [13]]
    batch = build_batch(prompts, completions, pad_id=0)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["response_mask"]
    assert ids.shape == labels.shape == mask.shape == batch["attention_mask"].shape == (3, 5)
    assert batch["prompt_lengths"].tolist() == [3, 1, 2]
    assert torch.equal(mask, labels != -100) and mask.dtype == torch.bool
    for b, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n = len(p), len(p) + len(c)
        assert ids[b, :n].tolist() == p + c
        assert (ids[b, n:] == 0).all() and batch["attention_mask"][b].tolist() == [1] * n + [0] * (
            5 - n
        )
        # Label tokens, in order, are the completion; each equals the next input token.
        assert labels[b][mask[b]].tolist() == c
        for t in range(5):
            if mask[b, t]:
                assert labels[b, t] == ids[b, t + 1] and n_p - 1 <= t < n - 1
        # Prompt positions (except the last, which predicts completion[0]), padding and the last
        # position are ignored.
        assert (labels[b, : n_p - 1] == -100).all()
        assert (labels[b, n - 1 :] == -100).all()
    assert (labels[:, -1] == -100).all()


def test_labels_align_with_logits_without_a_shift():
    # A "model" whose logits at t put all mass on input_ids[t + 1] has zero loss on labels as-is.
    batch = build_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    ids, labels = batch["input_ids"], batch["labels"]
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    logits = torch.nn.functional.one_hot(nxt, 16).float() * 100
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    assert loss.item() < 1e-6
    wrong = torch.nn.functional.one_hot(ids, 16).float() * 100  # unshifted: predicts itself
    assert torch.nn.functional.cross_entropy(wrong.transpose(1, 2), labels).item() > 10


def test_build_batch_from_encoded_chat_examples(tok):
    exs = [Example("hi", "hello", "a"), Example([{"role": "user", "content": "x"}], "y", "b")]
    enc = encode_dataset(exs, tok, max_length=64)
    batch = build_batch(
        [e.prompt_ids for e in enc], [e.completion_ids for e in enc], pad_id=tok.pad_token_id
    )
    first = batch["labels"][0][batch["response_mask"][0]].tolist()
    assert tok.decode(first) == "hello<|eos|>"
    # The last prompt token, the one predicting the completion, is the assistant marker.
    t0 = int(batch["response_mask"][0].nonzero()[0])
    assert batch["input_ids"][0, t0] == tok.convert_tokens_to_ids("<|assistant|>")


def test_batch_for_generation_left_pads():
    ids, mask = batch_for_generation([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        batch_for_generation([[1], []], pad_id=0)


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


def _take(sampler: EpochSampler, n: int) -> list[list[int]]:
    return [next(sampler) for _ in range(n)]


def test_sampler_is_deterministic_and_seeded():
    a = _take(EpochSampler(20, 4, seed=3), 12)
    assert a == _take(EpochSampler(20, 4, seed=3), 12)
    assert a != _take(EpochSampler(20, 4, seed=4), 12)
    assert a[:5] != a[5:10]  # epochs are reshuffled
    assert _take(EpochSampler(6, 3, shuffle=False), 3) == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


@pytest.mark.parametrize("n,batch", [(20, 4), (10, 3), (3, 5)])
def test_sampler_covers_every_index_once_per_epoch(n, batch):
    s = EpochSampler(n, batch, seed=0)
    stream = [i for b in _take(s, (3 * n) // batch + 1) for i in b]
    assert all(len(b) == batch for b in _take(EpochSampler(n, batch), 5))  # always full
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    # Epoch e's order comes from seed + e.
    perm1 = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    assert stream[n : 2 * n] == perm1


def test_sampler_resume_equals_continuing():
    s = EpochSampler(10, 3, seed=7)
    _take(s, 5)  # mid-epoch, across an epoch boundary
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint round trip
    expected = _take(s, 10)
    r = EpochSampler(10, 3, seed=7)
    r.load_state_dict(state)
    assert _take(r, 10) == expected
    assert r.epoch == s.epoch and r.position == s.position
    with pytest.raises(HPDError, match="same data"):
        EpochSampler(11, 3, seed=7).load_state_dict(state)
    with pytest.raises(HPDError, match="same seed"):
        EpochSampler(10, 3, seed=8).load_state_dict(state)


def test_two_ranks_equal_one_rank_with_double_batch():
    one = EpochSampler(13, 6, seed=1)
    r0 = EpochSampler(13, 3, seed=1, num_replicas=2, rank=0)
    r1 = EpochSampler(13, 3, seed=1, num_replicas=2, rank=1)
    for _ in range(9):
        a, b = next(r0), next(r1)
        assert a + b == next(one)
        assert len(a) == len(b) == 3
    assert r0.state_dict() == r1.state_dict() == one.state_dict()
    with pytest.raises(HPDError, match="rank"):
        EpochSampler(13, 3, num_replicas=2, rank=2)


@pytest.mark.parametrize("cut", ['{"prompt": "p", "completion": "c"', '{"prompt": "p", "completion": "cut he',
                                 '{"prompt": "p", "completion": ', '{"prompt": "p", '])
def test_row_cut_at_its_end_is_reported_as_truncated(tmp_path, cut):
    """A file cut mid-row (a copy that stopped, a full disk) says so, not 'invalid JSON at column 1'."""
    path = tmp_path / "cut.jsonl"
    path.write_text(GOOD + "\n" + GOOD + "\n" + cut)
    with pytest.raises(HPDError, match=r"cut\.jsonl line 3: invalid JSON: the row is truncated \(unterminated JSON"):
        load_examples(str(path))
    path.write_text(GOOD + "\n" + '{"prompt": "p", x}' + "\n")  # broken inside: the position, not "truncated"
    with pytest.raises(HPDError, match=r"line 2: invalid JSON \(Expecting property name .* at column 17\)"):
        load_examples(str(path))
