"""The LM-head view of a model: its decoder's final hidden states and `lm_head_of(model)`, an
`LMHead` (weight, bias and what the architecture applies after them: Gemma 2's softcap, Granite's
scale, ...), so that the losses compute logits chunk by chunk without a (B, T, V) tensor; heads hpd
cannot reproduce are refused by name. Also gradient checkpointing and the packed-batch inputs.

    >>> import torch
    >>> from hpd.models.loading import load_model
    >>> model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    >>> ids = torch.tensor([tok.encode("hello")]); mask = torch.ones_like(ids)
    >>> h_BTH = final_hidden_states(model, ids, mask)
    >>> torch.allclose(lm_head_of(model).logits(h_BTH), model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    True
"""

from __future__ import annotations

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PreTrainedModel

from hpd.errors import HPDError
from hpd.objectives.head import IDENTITY, LMHead, LogitTransform
from hpd.models.loading import is_peft_model


_SOFTCAP, _MUL, _DIV = "softcap", "multiply", "divide"
_LOGIT_TRANSFORMS: dict[str, tuple[str, str]] = {
    **{t: ("final_logit_softcapping", _SOFTCAP) for t in (
        "gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "vaultgemma", "nanochat",
        "beam", "inkling2_text", "inkling2_loop_text")},
    "recurrent_gemma": ("logits_soft_cap", _SOFTCAP),
    "xlstm": ("output_logit_soft_cap", _SOFTCAP),
    **{t: ("logit_scale", _MUL) for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")},
    **{t: ("logits_scaling", _DIV) for t in (
        "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")},
    "hyperclovax": ("logits_scaling", _MUL),  # multiplies, where Granite's field of that name divides
    "falcon_h1": ("lm_head_multiplier", _MUL),
}

# Architectures whose logits are not any transform of `h @ W.T + b` of the decoder's final hidden
# states: {model_type: what they do}. Their chunked views would be wrong, so they are refused.
_PREDICTION_HEAD = ("a prediction head (dense layer, activation, layer norm) between its final hidden states and "
                    "the output embedding")
_UNSUPPORTED_HEADS: dict[str, str] = {
    **{t: _PREDICTION_HEAD for t in (
        "bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "modernbert-decoder",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
        "xmod")},
    "dory": "a learned per-token logit scale (DoryLMHead.logit_scale)",
    "inkling_text": "hidden states divided by logits_mup_width_multiplier and logits cut to unpadded_vocab_size",
    "gemma4_assistant": "a masked embedding (centroid-routed logits)",
    "gemma4_unified_assistant": "a masked embedding (centroid-routed logits)",
    "clvp": "a final layer norm in the causal LM, after the decoder",
    "git": "image tokens ahead of the text positions",
    "prophetnet": "n-gram prediction streams",
    # (h / s) @ W.T is a scale of the logits, but the Trainer integrations read the head's input,
    # which is already divided: one rule could not serve both, so it is refused until needed.
    "minicpm3": "its final hidden states divided by logits_scaling before the LM head",
}

# nn.Linear subclasses whose forward is h @ W.T + b still (in float32), only computed differently.
_LINEAR_HEADS = {"ErgoLinearWithFP32Output"}  # casts the operands and accumulates in float32

# Config fields that, on an architecture not listed above, would mean an unknown logit transform.
_TRANSFORM_FIELD = re.compile(r"^(final_logit_softcapping|(output_)?logits?_soft_?cap(ping)?|logits?_scal(e|ing)|"
                              r"lm_head_multiplier|output_multiplier|logits?_multiplier|logits_mup.*)$")
_NEUTRAL = (None, 1, 1.0, False)


def logit_transform_field(config: dict) -> str | None:
    """The logit-transform field (e.g. "final_logit_softcapping=30") that a model's config.json (a dict)
    sets for an architecture that applies one, or None. For data written before hpd applied them."""
    for c in (config, config.get("text_config") or {}):
        rule = _LOGIT_TRANSFORMS.get(c.get("model_type", ""))
        if rule is not None and c.get(rule[0]) not in (None, 1, 1.0):
            return f"{rule[0]}={c[rule[0]]:g}"
    return None


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (its config and module names are the base model's)."""
    return model.get_base_model() if is_peft_model(model) else model


def lm_head_of(model: PreTrainedModel, *, hint: str = "") -> LMHead:
    """The model's LM head as the losses apply it: `model(...).logits` equals
    `lm_head_of(model).logits(final_hidden_states(model, ...))` (`hpd.objectives.head.LMHead`:
    weight `(V, H)`, bias `(V,)` or None, and the model's logit transform: Gemma 2's softcap,
    Granite's `logits_scaling`, Cohere's `logit_scale`, ...).

    Raises `HPDError`, naming what the model does, for a model whose logits are something else
    (a prediction head, a head with its own forward, an unknown logit transform in its config);
    `hint` (e.g. "set objective.chunk_size=0") ends that message: what the caller can do instead.
    """
    try:
        return _lm_head(model)
    except HPDError as e:
        if not hint:
            raise
        raise HPDError(f"{e}; or {hint}") from None


def _lm_head(model: PreTrainedModel) -> LMHead:
    base = _unwrapped(model)
    try:
        config = base.config.get_text_config()
    except (AttributeError, ValueError):  # none, or several (an audio model's): the config itself
        config = base.config
    kind = getattr(config, "model_type", "") or ""
    who = f"{type(base).__name__} (model_type '{kind}')"
    head = model.get_output_embeddings()
    if kind in _UNSUPPORTED_HEADS:
        raise HPDError(f"{who} applies {_UNSUPPORTED_HEADS[kind]}, which hpd's hidden-state losses and teacher views "
                       "cannot reproduce: use a causal LM whose logits are its output embedding of its final hidden states")
    if not isinstance(head, nn.Linear):
        raise HPDError(
            f"{who} has no linear LM head (got {type(head).__name__}): "
            "use a causal LM whose get_output_embeddings() is an nn.Linear"
        )
    if type(head).forward is not nn.Linear.forward and type(head).__name__ not in _LINEAR_HEADS:
        raise HPDError(f"{who}'s LM head {type(head).__name__} has its own forward, which hpd's hidden-state losses and "
                       "teacher views cannot reproduce: use a causal LM whose LM head is a plain nn.Linear")
    head_name = next((n for n, m in base.named_modules() if m is head), "")
    if "." in head_name:
        raise HPDError(f"{who}'s output embedding is '{head_name}', inside a module that transforms the hidden states "
                       "first, which hpd's hidden-state losses cannot reproduce: use a causal LM with a top-level LM head")
    transform = IDENTITY
    if kind in _LOGIT_TRANSFORMS:
        name, how = _LOGIT_TRANSFORMS[kind]
        value = getattr(config, name, None)
        if value is not None:
            value = float(value)
            transform = (LogitTransform(softcap=value) if how == _SOFTCAP else
                         LogitTransform(scale=value) if how == _MUL else LogitTransform(scale=1.0 / value))
    else:
        unknown = sorted(f for f, v in vars(config).items() if _TRANSFORM_FIELD.match(f) and v not in _NEUTRAL)
        if unknown:
            raise HPDError(f"{who} has {', '.join(f'{f}={getattr(config, f)!r}' for f in unknown)} in its config: a "
                           "logit transform hpd does not know how this architecture applies, so its hidden-state "
                           "losses and teacher views would be wrong")
    return LMHead(head.weight, head.bias, transform)


def _decoder_of(model: PreTrainedModel) -> nn.Module:
    """The transformer body under the LM head (`model.model` for Llama-family models)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    if getattr(model, "model", None) is not None:
        return model.model
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        return base
    raise HPDError(
        f"cannot find the decoder of {type(model).__name__}: expected a causal LM with "
        "get_decoder(), .model or .base_model"
    )


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in the backward pass (while the model is in
    training mode) instead of keeping them from the forward pass.

    Non-reentrant checkpointing: the same gradients, also for LoRA adapters on frozen weights and
    for the chunked loss (which reads the decoder's final hidden states).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise HPDError(f"student.gradient_checkpointing: {type(model).__name__} does not support gradient "
                       "checkpointing; set student.gradient_checkpointing=false")
    # The config's use_cache stays as it is (final/ keeps it): the training forwards pass
    # use_cache=False themselves, and generation runs in eval mode, where nothing is recomputed.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def model_inputs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The mask arguments of a forward: a packed batch gives position_ids and no 2D mask (HF then
    builds the per-row mask from the restarted positions), a padded one its attention mask."""
    if position_ids is not None:
        return {"attention_mask": None, "position_ids": position_ids}
    return {"attention_mask": attention_mask}


def final_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) of `input_ids` (B, T), without computing logits.

    `lm_head_of(model).logits(...)` maps them to the logits `model(...)` returns, so a loss can
    project a chunk of positions at a time. With `position_ids` (B, T) the batch is packed
    (`hpd.data.packing`): the attention mask is dropped so the model keeps attention within each row.
    """
    out = _decoder_of(model)(input_ids=input_ids, **model_inputs(attention_mask, position_ids), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
