"""The byte tokenizer: lossless round trip, id layout, chat template, save/reload."""

import pytest
from transformers import AutoTokenizer

from hpd.models.tokenizer import SPECIAL_TOKENS, byte_tokenizer

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed",
    "héllo wörld, naïve café",
    "日本語のテキスト 🎉🚀 emoji",
    "Ωμέγα — “quotes” ‘single’ … ¿qué?",
    "a . b , c 's  don't",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_lossless(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_ids_are_the_utf8_bytes(tok):
    text = "aé日\n🎉"
    assert tok.encode(text) == list(text.encode("utf-8"))
    # Every single byte maps to its own id, including bytes that are not valid UTF-8 alone.
    vocab = tok.get_vocab()
    assert sorted(i for t, i in vocab.items() if t not in SPECIAL_TOKENS) == list(range(256))


def test_special_tokens_follow_the_bytes(tok):
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert tok.pad_token_id == 256 and tok.bos_token_id == 257 and tok.eos_token_id == 258
    # Plain encoding adds no special tokens; decoding can drop them.
    assert tok.encode("x") == [ord("x")]
    assert tok.decode([257, ord("h"), ord("i"), 258], skip_special_tokens=True) == "hi"


def test_chat_template(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|bos|><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>hello<|eos|>"
        "<|user|>bye<|end|>"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>hi<|end|><|assistant|>")
    ids = tok.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ids) == prompt


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_reload_behave_the_same(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(again) == len(tok)
    assert again.get_vocab() == tok.get_vocab()
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(again.encode(text)) == text
    assert again.chat_template == tok.chat_template
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (256, 257, 258)
    messages = [{"role": "user", "content": "héllo"}]
    assert again.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    ) == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
