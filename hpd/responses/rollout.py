"""Generate completions from a model: student rollouts, teacher samples, evaluation answers.

`generate_completions` works on token ids (what the trainer needs); `generate_text` takes strings
or chat messages and returns decoded text (what evaluation and the CLI need). Both batch prompts
with left padding through Hugging Face `generate`, sample when `temperature > 0` (greedy
otherwise), and stop at eos. A fixed `seed` gives the same samples without touching the caller's
global random state.

The trainer's rollouts go through a `GenerationBackend` (`generate(model, tokenizer, prompts,
settings, seed)` plus the hook `after_optimizer_step(model)`); `HFGenerate` is today's, on Hugging
Face `generate` in the training process. A backend that serves generation elsewhere (e.g. vLLM
holding its own copy of the weights) is one new class: it syncs the student's new weights in
`after_optimizer_step`, which the trainer calls after every optimizer step it takes: `VLLMGenerate`
(`hpd.responses.vllm_generate`, a vLLM server on the student's weights) is that, chosen by `hpd.responses.backends.select_backend`
(`regime.backend`).

    >>> from hpd.models.loading import load_model
    >>> from hpd.responses.rollout import generate_completions, generate_text
    >>> model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    >>> outs = generate_completions(model, tok, [tok.encode("hi"), tok.encode("hello")],
    ...                             max_new_tokens=5, seed=0)
    >>> [len(o) <= 5 for o in outs]
    [True, True]
    >>> texts = generate_text(model, tok, ["What is 2+2?"], max_new_tokens=5, temperature=0.0)
    >>> isinstance(texts[0], str)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hpd.errors import HPDError


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos plus the model's generation eos ids.

    Instruct models often end turns with a token other than the tokenizer's eos (e.g.
    `<|im_end|>`), listed only in their generation config.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for i in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise HPDError(
            "the tokenizer has no eos token, so generation cannot stop: set tokenizer.eos_token"
        )
    return ids


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch inside a forked RNG so the caller's random state is left as it was."""
    if seed is None:
        yield
        return
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _left_pad(
    batch: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into input_ids (B, T) and attention_mask (B, T)."""
    width = max(len(p) for p in batch)
    ids_BT = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        if prompt:
            ids_BT[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask_BT[row, width - len(prompt):] = 1
    return ids_BT.to(device), mask_BT.to(device)


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Generate a completion for each prompt; returns only the new ids, in prompt order.

    Each completion stops after the first eos (which it keeps) or after `max_new_tokens`; padding
    is removed. `temperature <= 0` means greedy decoding; `top_k=0` and `top_p=1` disable those
    filters. `on_batch(n)` is called after each batch of n prompts (e.g. a progress bar's update).
    """
    if max_new_tokens < 1:
        raise HPDError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise HPDError(f"batch_size must be at least 1, got {batch_size}")
    if not 0.0 < top_p <= 1.0:
        raise HPDError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise HPDError(f"top_k must be 0 (off) or positive, got {top_k}")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise HPDError(
            f"prompt(s) {empty[:5]} are empty: every prompt needs at least one token (e.g. bos)"
        )
    if not prompt_ids:
        return []

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    do_sample = temperature > 0
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}

    # Longest prompts first so each batch holds prompts of similar length (less padding).
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(seed, device):
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                ids_BT, mask_BT = _left_pad([prompt_ids[i] for i in rows], pad_id, device)
                out_BS = model.generate(
                    input_ids=ids_BT,
                    attention_mask=mask_BT,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                    **sampling,
                )
                for row, i in enumerate(rows):
                    results[i] = _until_eos(out_BS[row, ids_BT.shape[1]:].tolist(), eos_ids)
                if on_batch is not None:
                    on_batch(len(rows))
    finally:
        model.train(was_training)
    return results


class GenerationBackend:
    """How the trainer samples completions from a model (student rollouts, teacher generations)."""

    def generate(self, model, tokenizer, prompt_ids: list[list[int]], settings, *, seed: int) -> list[list[int]]:
        """One completion per prompt (new ids only, through the first eos), sampled as `settings`
        (`hpd.responses.regimes.SamplingSettings`) say; a pure function of the weights, prompts and `seed`."""
        raise NotImplementedError

    def after_optimizer_step(self, model) -> None:
        """Called with the student after every optimizer step taken. A backend generating from its
        own copy of the weights (another process, an inference engine) loads the new weights here."""

    def for_teacher(self) -> GenerationBackend:
        """The backend for the teacher's generations (a backend bound to one model gives another)."""
        return self

    def metrics(self) -> dict[str, float]:
        """Cumulative figures the run logs with each step (e.g. weight-sync seconds); none by default."""
        return {}

    def close(self) -> None:
        """Release what the backend holds (a server process it started); called when the run ends."""


class HFGenerate(GenerationBackend):
    """Hugging Face `generate` on the model itself, in this process (`generate_completions`)."""

    def generate(self, model, tokenizer, prompt_ids, settings, *, seed):
        s = settings
        return generate_completions(model, tokenizer, prompt_ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                    top_p=s.top_p, top_k=s.top_k, batch_size=s.batch_size, seed=seed)


def _until_eos(new_ids: list[int], eos_ids: list[int]) -> list[int]:
    """Cut after the first eos, dropping the padding `generate` appends to finished rows."""
    for pos, tok in enumerate(new_ids):
        if tok in eos_ids:
            return new_ids[: pos + 1]
    return new_ids


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict]],
    *,
    chat_template: str = "auto",
) -> list[list[int]]:
    """Token ids for each prompt, chat-templated with a generation prompt where applicable.

    `chat_template`: "auto" (use the tokenizer's template when it has one), "none" (plain text;
    message lists are then an error), or a jinja template string to use instead.
    """
    template: str | None
    if chat_template == "none":
        template = None
    elif chat_template == "auto":
        template = tokenizer.chat_template if getattr(tokenizer, "chat_template", None) else None
    else:
        template = chat_template
    out: list[list[int]] = []
    for k, prompt in enumerate(prompts):
        if isinstance(prompt, str) and template is None:
            out.append(list(tokenizer.encode(prompt, add_special_tokens=True)))
            continue
        if template is None:
            raise HPDError(
                f"prompt {k} is a list of chat messages but no chat template is in use "
                f"(chat_template={chat_template!r}, tokenizer has "
                f"{'one' if getattr(tokenizer, 'chat_template', None) else 'none'}): pass plain "
                "strings, or a tokenizer with a chat template and chat_template='auto'"
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=True,
            # transformers 5 returns a BatchEncoding by default; ask for the plain id list.
            return_dict=False,
        )
        out.append(list(ids))
    return out


def check_context(model: PreTrainedModel, prompt_ids: list[list[int]]) -> None:
    """HPDError for a prompt longer than the model's context (`max_position_embeddings`): what it
    would generate from there is noise. (A prompt that fits but leaves fewer than `max_new_tokens`
    positions is generated as asked: most answers end well before, and the bundled models' task
    budgets do pass their 256-token context.)"""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or not prompt_ids:
        return
    lengths = [len(p) for p in prompt_ids]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > context:
        raise HPDError(f"prompt {longest} is {lengths[longest]} tokens, longer than the model's context of {context} "
                       f"tokens ({sum(n > context for n in lengths)} such prompts): shorten them or leave them out")


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict]],
    *,
    chat_template: str = "auto",
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Decoded completions (special tokens removed) for string or chat-message prompts.

    A string is sent as a single user message when a chat template is in use (see
    `encode_prompts` for `chat_template`), else as plain text.
    """
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    check_context(model, prompt_ids)
    completions = generate_completions(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        batch_size=batch_size,
        seed=seed,
        on_batch=on_batch,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
