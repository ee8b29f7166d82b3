"""Typed run configuration: flat dataclasses, YAML files and ``key=value`` overrides.

Over 600 lines: one flat dataclass per config section, each key with its help text and range
(the command line, the YAML reference and the checks are derived from them); the conversion and
the checks across sections read them all.

A run is described by one `Config`: a few top-level fields plus one flat section per concern
(`student`, `teacher`, `data`, `objective`, `regime`, `optim`, `log`, `save`). Every field carries
its help text and its allowed values in the dataclass field metadata, so one generic `validate()`
checks everything and `config_help()` documents everything from the same source (it is what
`hpd train --help` prints).

    >>> from hpd.config import load_config
    >>> cfg = load_config(None, ["optim.lr=3e-4", "max_steps=20", "data.eval=null"])
    >>> cfg.optim.lr, cfg.max_steps, cfg.data.eval
    (0.0003, 20, None)
    >>> load_config(None, ["optim.lrr=1"])
    Traceback (most recent call last):
    ...
    hpd.errors.HPDError: unknown config key 'optim.lrr' (in override 'optim.lrr=1'); did you mean 'optim.lr'? `hpd train --help` lists every key

Values from YAML files and overrides are converted to the field's type (an int is accepted for a
float field, ``'1e-3'`` is read as a float, ``null``/``none`` means None for optional fields) and a
wrong type, a value out of range or an unknown choice raises `HPDError` naming the dotted key.

The conversion and checks run on pydantic v2: a model derived from the dataclasses (each field's
range, choices and help declared once, in `field_`) converts the values and collects every type,
range and choice error, which this module turns into one-line messages. We chose pydantic over
OmegaConf because it checks ranges and choices itself (OmegaConf checks only types) and is already
a dependency of transformers; the dataclasses stay plain, so a `Config` is built, compared and
edited as before, and only the help text, the did-you-mean hints and the commented YAML are ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Iterator, Literal

import yaml

from hpd.errors import HPDError
from hpd.objectives import OBJECTIVES, Param, config_params, objective_class, param_fields

if TYPE_CHECKING:  # pydantic is imported where the schema is built (`hpd train --help` never needs it)
    from pydantic import BaseModel

__all__ = [
    "Config",
    "ModelConfig",
    "StudentConfig",
    "TeacherConfig",
    "NamedTeacher",
    "OpsdConfig",
    "DataConfig",
    "ObjectiveConfig",
    "RegimeConfig",
    "OptimConfig",
    "LogConfig",
    "SaveConfig",
    "OBJECTIVE_NAMES",
    "OBJECTIVE_PARAM_FIELDS",
    "field_",
    "validate",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "config_help",
    "iter_fields",
    "mapping_fields",
    "ALIASES",
]

# Derived from the objectives' registry (`hpd.objectives.OBJECTIVES`), where each objective
# declares its parameters once: the names, and each objective's parameters -> their config fields.
OBJECTIVE_NAMES = tuple(OBJECTIVES)
OBJECTIVE_PARAM_FIELDS: dict[str, dict[str, str]] = {n: param_fields(c) for n, c in OBJECTIVES.items() if c.params}

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # the keys of a mapping field (teacher.named): names for metrics and files
INT_MAX = 2**63 - 1  # the largest int any field takes (an int64)
# The most parameters a 'tiny' model may have: beyond, building it would exhaust memory, not fail.
TINY_MAX_PARAMETERS = 2 * 10**9

_CHECK_KEYS = {"choices", "min", "max", "min_exclusive", "max_exclusive", "nonempty", "import_path"}


def field_(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with its help text and checks in the metadata.

    checks: ``choices=[...]``, ``min=x``, ``max=y``, ``min_exclusive=True`` / ``max_exclusive=True``
    (make the bound strict), ``nonempty=True`` (strings), ``import_path=True`` (besides the choices, a
    user's objective class as ``module:Class``). None values of optional fields skip them.
    """
    unknown = set(checks) - _CHECK_KEYS
    if unknown:  # a typo in a check would otherwise silently disable it
        raise TypeError(f"unknown field checks {sorted(unknown)}; allowed: {sorted(_CHECK_KEYS)}")
    if isinstance(default, (list, dict)):  # a list or mapping field: every Config gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The student model."""

    path: str = field_(
        "tiny",
        "A Hugging Face model directory or Hub id (org/name, from the HF cache or downloaded into "
        "it), a .gguf file, or 'tiny' for a random-init tiny Llama with the byte-level tokenizer "
        "(sized by the tiny_* fields).",
        nonempty=True,
    )
    dtype: str = field_(
        "float32",
        "Weight dtype to load the model in; 'auto' uses the checkpoint's own dtype.",
        choices=["float32", "bfloat16", "float16", "auto"],
    )
    trust_remote_code: bool = field_(
        False, "Allow model code shipped with the checkpoint to run (off for safety)."
    )
    tiny_arch: str = field_("llama", "Architecture of the 'tiny' model (both use the byte-level tokenizer).",
                            choices=["llama", "qwen2"])
    tiny_layers: int = field_(2, "Layers of the 'tiny' model.", min=1, max=1024)
    tiny_hidden: int = field_(64, "Hidden size of the 'tiny' model (divisible by tiny_heads).", min=1, max=65536)
    tiny_heads: int = field_(4, "Attention heads of the 'tiny' model.", min=1, max=1024)
    tiny_intermediate: int = field_(128, "MLP intermediate size of the 'tiny' model.", min=1, max=262144)
    tiny_max_positions: int = field_(1024, "Maximum sequence length of the 'tiny' model.", min=8, max=1 << 20)
    init_seed: int | None = field_(
        None, "Seed of the 'tiny' model's random initialisation; null = the top-level seed."
    )


@dataclass
class StudentConfig(ModelConfig):
    """The student model (trained)."""

    path: str = field_(
        "tiny",
        "A Hugging Face model directory or Hub id (org/name, from the HF cache or downloaded into "
        "it), a .gguf file, 'tiny' for a random-init tiny Llama with the byte-level tokenizer "
        "(sized by the tiny_* fields), or 'teacher' together with init_from_teacher.",
        nonempty=True,
    )
    init_from_teacher: str | None = field_(
        None,
        "Build the student from the teacher, keeping a subset of its layers (plus embeddings, "
        "norms and LM head): every:K (layers 0, K, 2K, ...), spread:N (N layers evenly spaced, "
        "first and last kept) or a list like 0,3,7; null = load student.path.",
        nonempty=True,
    )
    lora_rank: int = field_(
        0,
        "LoRA rank of the student (needs peft): > 0 trains low-rank adapters on every linear layer "
        "of the decoder instead of all weights; 0 = full fine-tuning. The final model is saved "
        "with the adapters merged.",
        min=0,
    )
    lora_alpha: float = field_(16.0, "LoRA scaling alpha (the update is scaled by alpha / rank).", min=0.0, min_exclusive=True)
    lora_dropout: float = field_(0.0, "LoRA dropout on the adapters' input.", min=0.0, max=1.0, max_exclusive=True)
    gradient_checkpointing: bool = field_(
        False,
        "Recompute each decoder layer's activations in the backward pass instead of keeping them: "
        "activation memory of about one layer instead of all, for about one more forward pass of "
        "time; the same loss and gradients (with the chunked loss too).",
    )


@dataclass
class NamedTeacher:
    """One teacher of `teacher.named`: exactly one of a model, a teacher cache or servers."""

    path: str | None = field_(None, "A Hugging Face model directory or Hub id, run online (teacher.dtype, "
                              "teacher.trust_remote_code apply).", nonempty=True)
    cache: str | None = field_(None, "A teacher cache built by `hpd cache-teacher` over the rows it teaches.",
                               nonempty=True)
    server: str | None = field_(None, "Teacher inference servers, URL[,URL...] (the teacher.server_* settings "
                                "apply).", nonempty=True)

    def source(self) -> tuple[str, str]:
        """(kind, value): ("path", DIR), ("cache", DIR) or ("server", URLS); assumes one is set."""
        return next((k, v) for k in ("path", "cache", "server") if (v := getattr(self, k)) is not None)


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher model (frozen)."""

    def __post_init__(self):
        # A mapping read from YAML or a dict arrives as plain dicts: each becomes a NamedTeacher.
        if isinstance(self.named, dict):
            self.named = {k: NamedTeacher(**v) if isinstance(v, dict) else v for k, v in self.named.items()}

    path: str = field_(
        "tiny",
        "A Hugging Face model directory or Hub id (org/name, from the HF cache or downloaded into "
        "it), a .gguf file, 'tiny' for a random-init tiny Llama with the byte-level tokenizer, or "
        "'none' (with objective.name=sft, or with regime.name=self, where the student is its own "
        "teacher).",
        nonempty=True,
    )
    tiny_layers: int = field_(4, "Layers of the 'tiny' model.", min=1, max=1024)
    tiny_hidden: int = field_(
        128, "Hidden size of the 'tiny' model (divisible by tiny_heads).", min=1, max=65536
    )
    tiny_heads: int = field_(4, "Attention heads of the 'tiny' model.", min=1, max=1024)
    tiny_intermediate: int = field_(256, "MLP intermediate size of the 'tiny' model.", min=1, max=262144)
    cache: str | None = field_(
        None,
        "A teacher cache built by `hpd cache-teacher` over this run's data: the teacher is never "
        "loaded, its log-probabilities are read from the cache (exact at the sequence token, top-K "
        "plus a tail bucket elsewhere). Only with regime.name=dataset; null = run the teacher.",
    )
    server: str | None = field_(
        None,
        "Teacher inference servers (OpenAI-compatible completions with prompt log-probabilities, "
        "e.g. `hpd serve-teacher DIR` or vLLM), as URL[,URL...]: the teacher is never loaded here, "
        "each micro-batch's log-probabilities are asked of the servers in turn while the student "
        "computes (exact at the sequence token, top-K plus a tail elsewhere, as a cache). Checked "
        "at start against the student's tokenizer and vocabulary; needs objective.temperature=1. "
        "null = no server.",
    )
    server_top_k: int = field_(
        32,
        "With teacher.server: teacher tokens asked per position besides the sequence token (at most "
        "the server's --max-logprobs; 0 = only the sequence token, enough for sft/orkl).",
        min=0,
    )
    server_exact_samples: bool = field_(
        False,
        "With teacher.server and objective.name=hpd: the student's samples outside the served top-K "
        "are scored exactly by a second request after the student's forward (else estimated from the "
        "tail mass spread evenly); exact HPD weights at any K, for one more round trip per micro-batch.",
    )
    server_timeout: float = field_(
        120.0, "With teacher.server: seconds a request may take before it is retried.", min=0, min_exclusive=True
    )
    server_retries: int = field_(
        3,
        "With teacher.server: further tries of a failed request (each on the next server, with "
        "exponential backoff from 1 s) before the run stops with an error naming the server.",
        min=0,
    )
    cross_tokenizer: bool = field_(
        False,
        "Distill across tokenizers: the teacher runs on its own tokenization of each response "
        "(its own chat template for the prompt), lined up with the student's by byte offsets. "
        "hpd, orkl and sft read the teacher's log-probability of the same text span (positions "
        "whose token is no whole aligned span are masked); uld compares sorted distributions. "
        "With the online teacher, a cache built across tokenizers (`hpd cache-teacher --student`) "
        "or teacher.server (teacher.path then names the teacher's tokenizer); regime.name dataset "
        "or student (docs/objectives.md).",
    )
    named: dict[str, NamedTeacher] = field_(
        {},
        "A teacher per row: named teachers, each {path: DIR} (a model run online), {cache: DIR} or "
        "{server: URL[,URL...]}, e.g. `named: {math: {path: models/math}, chat: {server: http://b:8000}}` "
        "(override: teacher.named.math.path=DIR). Each training row names its teacher in the column "
        "data.teacher_column; rows without it are taught by this section's own teacher (path, cache or "
        "server; its name is 'default'), or refused when teacher.path=none. Every teacher is checked "
        "against the student's tokenizer and vocabulary at start (docs/guides/teachers.md).",
    )


@dataclass
class DataConfig:
    """Training and evaluation data (JSONL with prompt/completion or chat messages)."""

    train: str = field_(
        "examples/tiny.jsonl",
        "Training data: a .jsonl/.json/.parquet file, a datasets save_to_disk directory (dir:split), or a "
        "Hub dataset org/name[:split] or org/name:config:split (a local path of that name wins).",
        nonempty=True,
    )
    eval: str | None = field_(
        None, "Evaluation data (as data.train); null = none, or a split of train (see eval_fraction)."
    )
    prompt_field: str = field_("prompt", "Row key holding the prompt text.", nonempty=True)
    completion_field: str = field_(
        "completion", "Row key holding the reference completion.", nonempty=True
    )
    messages_field: str = field_(
        "messages", "Row key holding a chat (list of {role, content} messages).", nonempty=True
    )
    max_length: int = field_(
        512, "Maximum tokens per sequence (prompt + completion); longer ones are truncated.", min=8
    )
    chat_template: str = field_(
        "auto",
        "Apply the tokenizer's chat template: auto = when the tokenizer has one, on = always "
        "(error if missing), none = never (plain text).",
        choices=["auto", "on", "none"],
    )
    on_bad_row: str = field_(
        "error",
        "What to do with a malformed data row: error = stop with its line number, skip = drop it "
        "and count it.",
        choices=["error", "skip"],
    )
    eval_fraction: float = field_(
        0.0,
        "Fraction of train held out for evaluation when data.eval is null (0 = no split).",
        min=0.0,
        max=0.5,
    )
    packing: bool = field_(
        False,
        "Sequence packing: each micro-batch's rows end to end in sequences of data.pack_length tokens, "
        "positions restarted per row and attention kept within it (attention eager, sdpa, "
        "flex_attention or flash_attention_2/3); the same loss as padded rows.",
    )
    streaming: bool = field_(
        False,
        "Read data.train as a stream (for data larger than memory: a JSONL file line by line, a Hub "
        "dataset through datasets' streaming), through a seeded shuffle buffer; its position is saved in "
        "checkpoints. Needs max_steps (not epochs), a data.eval file (not eval_fraction), and the dataset, "
        "student or mixed (off_policy dataset) regime without teacher.cache.",
    )
    shuffle_buffer: int = field_(
        10000, "data.streaming: rows held for the seeded shuffle of the stream (0 = the source's order).", min=0
    )
    teacher_column: str = field_(
        "teacher",
        "With teacher.named: the row key naming the row's teacher (one of teacher.named, or 'default'); "
        "a row without it (or null) is taught by the default teacher.",
        nonempty=True,
    )
    pack_length: int = field_(
        0,
        "data.packing: tokens per packed sequence; 0 = the micro-batch's longest row (attention never "
        "costs more than padded); a value >= batch_size x max_length = the whole micro-batch in one "
        "sequence, no padding (best with flash_attention_2's varlen kernel).",
        min=0,
    )


def _param_field(users: list[tuple[str, Param]]) -> Any:
    """The config field of an objective parameter, from its `Param` (default, range, help)."""
    p = users[0][1]
    checks: dict[str, Any] = {}
    if p.low is not None:
        checks.update(min=p.low, **({"min_exclusive": True} if p.low_open else {}))
    if p.high is not None:
        checks.update(max=p.high, **({"max_exclusive": True} if p.high_open else {}))
    text = "; ".join(f"{name}: {q.help}" if name else q.help for name, q in users)
    return field_(int(p.default) if p.integer else p.default, text if text.endswith(".") else text + ".", **checks)


def _objective_section() -> type:
    """`ObjectiveConfig`: the objective's name, every registered objective's parameters (one
    field per `Param`, shared where objectives share a key), the common ones, and the chunking."""
    names = "; ".join(f"{n} = {c.summary}" for n, c in OBJECTIVES.items())
    fields: list[tuple[str, type, Any]] = [("name", str, field_(
        "hpd", f"Objective: {names}. Or a user's Objective subclass by import path, module:Class "
        "(its parameters take their defaults unless they name one of these fields as Param.key).",
        choices=list(OBJECTIVES), import_path=True))]
    fields += [(key, int if users[0][1].integer else float, _param_field(users)) for key, users in config_params().items()]
    fields.append(("chunk_size", int, field_(
        1024,
        "Positions per chunk of the memory-lean loss, so (B, T, V) logits are never held at once; "
        "0 = unchunked.",
        min=0,
    )))
    cls = dataclasses.make_dataclass("ObjectiveConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = "The distillation objective (see docs/objectives.md for the mathematics)"
    return cls


ObjectiveConfig = _objective_section()


@dataclass
class RegimeConfig:
    """Where the response tokens come from (the data regime)."""

    name: str = field_(
        "dataset",
        "dataset = the data's completions, teacher = cached teacher generations, student = "
        "on-policy student rollouts, mixed = student with probability mixed_lambda per step, "
        "self = on-policy self-distillation (the student, shown a privileged context, is its own "
        "teacher; see the opsd section).",
        choices=["dataset", "teacher", "student", "mixed", "self"],
    )
    mixed_lambda: float = field_(
        0.5,
        "mixed: probability that an optimizer step uses student rollouts.",
        min=0.0,
        max=1.0,
    )
    off_policy: str = field_(
        "dataset",
        "mixed: the source used on the steps that do not use student rollouts.",
        choices=["dataset", "teacher"],
    )
    max_new_tokens: int = field_(64, "Maximum new tokens per rollout/generation.", min=1)
    temperature: float = field_(
        1.0,
        "Rollout sampling temperature (0 = greedy). Distinct from objective.temperature.",
        min=0.0,
    )
    top_p: float = field_(
        1.0, "Rollout nucleus sampling top-p.", min=0.0, max=1.0, min_exclusive=True
    )
    top_k: int = field_(0, "Rollout top-k sampling (0 = off).", min=0)
    backend: str = field_(
        "hf",
        "Student rollouts: hf = Hugging Face generate in the training process; vllm = a vLLM server "
        "(regime.vllm_url, or started from the engine environment, `make engine`) holding a copy "
        "of the student, its weights pushed before each rollout that follows an optimizer step "
        "(tested on CPUs; not yet run on a GPU); auto = vllm when regime.vllm_url is set, or a "
        "CUDA GPU is visible and the engine environment is there, else hf.",
        choices=["auto", "hf", "vllm"],
    )
    vllm_url: str | None = field_(
        None,
        "regime.backend=vllm: a running vLLM server (http://HOST:PORT) to sample rollouts from "
        "instead of starting one; started with VLLM_SERVER_DEV_MODE=1 and able to read this "
        "machine's files (the student's weights reach it as a safetensors file).",
    )
    vllm_python: str | None = field_(
        None,
        "regime.backend=vllm: the python of the environment with vLLM that starts the server "
        "(null = the repository's .venv-vllm, made by `make engine`).",
    )
    vllm_args: str = field_(
        "",
        "regime.backend=vllm: extra arguments for the server it starts (e.g. \"--enforce-eager\"); "
        "its environment is this process's (e.g. VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_KVCACHE_SPACE).",
    )
    vllm_gpu_memory: float = field_(
        0.3, "regime.backend=vllm on a GPU: fraction of the GPU's memory the vLLM server may take.",
        min=0.0, max=1.0, min_exclusive=True,
    )
    allow_biased_rollouts: bool = field_(
        False,
        "Train a sampled on-policy objective (orkl, hpd) on rollouts that are not samples of the "
        "loss distribution (regime.temperature != objective.temperature, top_p < 1, top_k > 0, or "
        "dropout in the student): refused unless true (then a warning).",
    )
    minibatches: int = field_(
        1,
        "Rollout reuse: optimizer steps one rollout batch is split into (M). A rollout batch holds "
        "minibatches x optim.batch_size x optim.grad_accum prompts per process; 1 with epochs=1 = "
        "a fresh rollout every step (the plain on-policy step).",
        min=1,
    )
    epochs: int = field_(
        1,
        "Rollout reuse: passes over each rollout batch (E); it feeds minibatches x epochs optimizer "
        "steps, its weights and HPD's y_hat fixed at rollout time, PPO-clipped by the ratio to the "
        "rollout policy.",
        min=1,
    )
    clip_low: float = field_(
        0.2, "Rollout reuse: a token with a negative weight stops training below ratio 1 - clip_low.",
        min=0.0, max=1.0, max_exclusive=True,
    )
    clip_high: float = field_(
        0.28, "Rollout reuse: a token with a positive weight stops training above ratio 1 + clip_high "
        "(0.2 / 0.28 as the HPD authors' verl recipe).", min=0.0,
    )
    dual_clip: float = field_(
        3.0, "Rollout reuse: dual clip, the loss of a negative-weight token is capped at ratio dual_clip "
        "(> 1; verl's default 3; 0 = off).", min=0.0,
    )
    teacher_cache: str | None = field_(
        None,
        "Directory of cached teacher generations; null = OUTPUT_DIR/../teacher_generations, "
        "keyed by a hash of the teacher and the data.",
    )


@dataclass
class OpsdConfig:
    """On-policy self-distillation (regime.name=self): one model, the teacher sees privileged text"""

    privileged_field: str = field_(
        "reference",
        "Row key holding the privileged text only the teacher sees (e.g. a verified reference "
        "solution); it may be data.completion_field.",
        nonempty=True,
    )
    teacher_template: str = field_(
        "Reference solution: {privileged}\n\n{prompt}",
        "The teacher's prompt: {privileged} is replaced by the privileged text, {prompt} by the "
        "student's prompt (the last user message of a chat). End it with {prompt} so that both "
        "contexts end alike before the response. Chat-templated like the student's prompt.",
        nonempty=True,
    )
    teacher_weights: str = field_(
        "frozen",
        "The teacher's weights: frozen = the initial weights (with a LoRA student: the base model, "
        "adapters disabled, no second copy), ema = an exponential moving average of the student, "
        "live = the current weights (no gradient).",
        choices=["frozen", "ema", "live"],
    )
    ema_decay: float = field_(
        0.99, "ema: teacher <- decay * teacher + (1 - decay) * student after each step.",
        min=0.0, max=1.0, max_exclusive=True,
    )
    response: str = field_(
        "rollout",
        "The response tokens the teacher scores: rollout = the student's own samples (on-policy, "
        "sampled with the regime.* settings), reference = the privileged text itself as an "
        "off-policy prefix (with hpd: its one-token approximate on-policy mode, no generation).",
        choices=["rollout", "reference"],
    )


@dataclass
class OptimConfig:
    """Optimizer, schedule and batching."""

    lr: float = field_(1e-3, "Peak learning rate (AdamW).", min=0.0, min_exclusive=True)
    weight_decay: float = field_(0.0, "AdamW weight decay.", min=0.0)
    adam_beta1: float = field_(0.9, "AdamW beta1.", min=0.0, max=1.0, max_exclusive=True)
    adam_beta2: float = field_(0.999, "AdamW beta2.", min=0.0, max=1.0, max_exclusive=True)
    fused_adamw: bool = field_(
        True, "Use torch's fused AdamW kernel (several times faster than its per-tensor loop on CPU and GPU; "
        "equal to it up to float rounding). false = the per-tensor loop."
    )
    warmup_ratio: float = field_(
        0.1, "Fraction of max_steps spent in linear warmup.", min=0.0, max=1.0
    )
    schedule: str = field_(
        "cosine", "Learning-rate decay after warmup.", choices=["cosine", "linear", "constant"]
    )
    min_lr_ratio: float = field_(
        0.0, "Final learning rate as a fraction of lr (cosine/linear).", min=0.0, max=1.0
    )
    batch_size: int = field_(8, "Sequences per micro-batch, per process.", min=1, max=65536)
    grad_accum: int = field_(1, "Micro-batches accumulated per optimizer step.", min=1, max=65536)
    max_grad_norm: float = field_(1.0, "Gradient-norm clipping threshold (0 = off).", min=0.0)
    mixed_precision: str = field_(
        "no",
        "Autocast precision of the forward passes; auto = bf16 on a CUDA GPU that supports it, "
        "no otherwise (a recipe that runs on CPU and GPU alike).",
        choices=["no", "bf16", "fp16", "auto"],
    )
    max_bad_steps: int = field_(
        5, "Consecutive steps with a NaN/inf loss or gradient (skipped) before the run stops.", min=1
    )


@dataclass
class LogConfig:
    """Logging and evaluation cadence."""

    every: int = field_(1, "Optimizer steps between train-metric lines in metrics.jsonl.", min=1)
    eval_every: int = field_(0, "Steps between evaluations (0 = only at the end).", min=0)
    eval_batches: int = field_(4, "Batches per evaluation.", min=1)
    tensorboard: str = field_(
        "auto",
        "TensorBoard logs (RUN/tensorboard/): auto = when tensorboard is installed and log.report_to is empty, "
        "on = required, off = never.",
        choices=["auto", "on", "off"],
    )
    report_to: list[str] = field_(
        [],
        "Experiment trackers that receive every metrics.jsonl line, through accelerate's trackers (as "
        "transformers' report_to): a list such as [tensorboard, wandb] or tensorboard,mlflow; each needs its "
        "package (pip install 'hpd-distill[trackers]'). Offline: tensorboard writes RUN/tensorboard/, mlflow a file "
        "store in RUN/mlruns/ (unless MLFLOW_TRACKING_URI is set), wandb RUN/wandb/ (WANDB_MODE=offline for "
        "no network). [] = log.tensorboard decides; [none] = no tracker at all.",
        choices=["tensorboard", "wandb", "mlflow", "none"],
    )
    progress: bool = field_(True, "Show progress with an ETA on stderr: a bar on a terminal, a line every 30 s "
                                  "otherwise (a log file).")
    diagnostics_every: int = field_(
        1,
        "Steps between full-distribution diagnostics (agreement, KL, entropy), which cost a "
        "teacher/student pass over the vocabulary.",
        min=1,
    )


@dataclass
class SaveConfig:
    """Checkpointing."""

    every: int = field_(0, "Steps between checkpoints (0 = only the final one).", min=0)
    keep_last: int = field_(2, "Checkpoints kept (older ones are deleted).", min=1)
    dtype: str = field_(
        "fp32",
        "Weight dtype of final/ on disk: fp32 (exact), bf16 or fp16 (half the size; training runs in "
        "the student's own dtype either way). Checkpoints keep the training dtype, so resume stays exact.",
        choices=["fp32", "bf16", "fp16"],
    )


@dataclass
class Config:
    """Top level."""

    output_dir: str = field_(
        "runs/hpd",
        "Run directory: checkpoints, metrics.jsonl, config.yaml and the final model.",
        nonempty=True,
    )
    max_steps: int = field_(100, "Optimizer steps to train (replaced by the one epochs gives, when set).", min=1)
    epochs: float | None = field_(
        None,
        "Run length in passes over the training rows (Hugging Face's num_train_epochs), instead of max_steps: "
        "max_steps becomes ceil(epochs x rows / (optim.batch_size x optim.grad_accum x processes)) once the data "
        "is read, and the run logs the count it derived. null = max_steps decides.",
        min=0.0,
        min_exclusive=True,
    )
    seed: int = field_(0, "Seed of every random choice (data order, samples, regime draws).")
    resume: str = field_(
        "auto",
        "auto = continue from the latest checkpoint in output_dir if there is one, never = start "
        "fresh (error if output_dir already holds checkpoints), or a checkpoint directory path.",
        nonempty=True,
    )
    resume_allow_changes: bool = field_(
        False,
        "Let resume continue a run whose config changed in keys that alter it (objective, lr, data, "
        "seed, ...); the change is recorded in metrics.jsonl and config_history.jsonl. false = such "
        "a resume is refused with the differing keys.",
    )
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    opsd: OpsdConfig = field(default_factory=OpsdConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    save: SaveConfig = field(default_factory=SaveConfig)

    def validate(self) -> "Config":
        """Check every field and the cross-field rules; raise HPDError. Returns self."""
        validate(self)
        return self

    def to_yaml(self, comments: bool = False) -> str:
        """The config as YAML (``comments=True`` adds each field's help as a comment)."""
        return _to_yaml(self, comments=comments)


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------

_NONE_WORDS = {"null", "none", "~", ""}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Annotations are strings (from __future__ import annotations); resolve them once per class.
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / `Optional[X]`; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _sections() -> dict[str, type]:
    return {f.name: t for f, t in _top_fields() if _is_section(t)}


def _top_fields() -> list[tuple[dataclasses.Field, Any]]:
    hints = _hints(Config)
    return [(f, hints[f.name]) for f in dataclasses.fields(Config)]


def iter_fields(cfg: Config | None = None) -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """Yield ``(dotted_key, field, type, value)`` for every leaf field, in declaration order.

    With ``cfg=None`` the values are the defaults.
    """
    cfg = Config() if cfg is None else cfg
    for f, tp in _top_fields():
        value = getattr(cfg, f.name)
        if _is_section(tp):
            sub_hints = _hints(tp)
            for sf in dataclasses.fields(tp):
                yield f"{f.name}.{sf.name}", sf, sub_hints[sf.name], getattr(value, sf.name)
        else:
            yield f.name, f, tp, value


@functools.cache
def _field_table() -> dict[str, tuple[Any, dict[str, Any]]]:
    """dotted key -> (type, metadata: help and checks) of every leaf field."""
    return {key: (tp, dict(f.metadata)) for key, f, tp, _value in iter_fields()}


def _all_keys() -> list[str]:
    return list(_field_table())


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def _describe_checks(meta: dict[str, Any]) -> str:
    """'(0, 1]', '>= 1', 'one of a|b' ... for help texts and error messages."""
    if "choices" in meta:
        return "one of " + "|".join(str(c) for c in meta["choices"]) + (" or module:Class" if meta.get("import_path") else "")
    lo, hi = meta.get("min"), meta.get("max")
    lo_x, hi_x = meta.get("min_exclusive", False), meta.get("max_exclusive", False)
    if lo is not None and hi is not None:
        return f"{'(' if lo_x else '['}{lo:g}, {hi:g}{')' if hi_x else ']'}"
    if lo is not None:
        return f"{'>' if lo_x else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_x else '<='} {hi:g}"
    return ""


def _suggest(word: str, options: Iterable[str]) -> str | None:
    """The closest option to a misspelt word, or None."""
    options = list(options)
    leaf = word.rsplit(".", 1)[-1]
    # A right key in the wrong place (`lr:` at top level) is a common slip: match the leaf name.
    same_leaf = [o for o in options if o.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) >= 1 and word not in options:
        return same_leaf[0]
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {o.rsplit(".", 1)[-1]: o for o in options}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


# --------------------------------------------------------------------------------------------
# The schema: a pydantic model derived from the dataclasses above
# --------------------------------------------------------------------------------------------


def _objective_name(value: str) -> str:
    """objective.name: a registered name, or a user's class by import path (checked by importing it)."""
    if ":" in value:
        objective_class(value)  # HPDError (a ValueError) says what is wrong with the path
    elif value not in OBJECTIVES:
        from pydantic_core import PydanticCustomError

        raise PydanticCustomError("choice", "not a registered objective")
    return value


def _field_type(tp: Any, meta: dict[str, Any]) -> Any:
    """The pydantic type of one field: its Python type with the range/choice/non-empty checks of
    its metadata as constraints (inside `Optional`, so that None skips them)."""
    from pydantic import AfterValidator, Field

    inner, optional = _split_optional(tp)
    constraints: dict[str, Any] = {}
    if meta.get("min") is not None:
        constraints["gt" if meta.get("min_exclusive") else "ge"] = meta["min"]
    if meta.get("max") is not None:
        constraints["lt" if meta.get("max_exclusive") else "le"] = meta["max"]
    elif inner is int:
        constraints["le"] = INT_MAX  # seeds and counts end up in int64 tensors and C longs
    if meta.get("nonempty"):
        constraints["pattern"] = r"\S"  # at least one non-blank character
    if typing.get_origin(inner) is dict:  # a mapping of names to a small section (teacher.named)
        key_t, value_t = typing.get_args(inner)
        inner = dict[Annotated[key_t, Field(pattern=NAME_PATTERN)], _model_of(value_t)]
    elif meta.get("import_path"):
        inner = Annotated[inner, AfterValidator(_objective_name)]
    elif "choices" in meta and typing.get_origin(inner) is list:
        inner = list[Literal[tuple(meta["choices"])]]  # a list field: each item one of the choices
    elif "choices" in meta:
        inner = Literal[tuple(meta["choices"])]
    typed = Annotated[inner, Field(**constraints)] if constraints else inner
    return typed | None if optional else typed


def _model_of(cls: type) -> type[BaseModel]:
    """A pydantic model with the fields (types, checks, defaults) of the dataclass `cls`."""
    from pydantic import ConfigDict, Field, create_model

    hints = _hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            fields[f.name] = (_model_of(tp), ...)
        else:
            default = f.default if f.default is not dataclasses.MISSING else Field(default_factory=f.default_factory)
            fields[f.name] = (_field_type(tp, dict(f.metadata)), default)
    config = ConfigDict(extra="forbid", allow_inf_nan=False)
    return create_model(cls.__name__, __config__=config, **fields)


@functools.cache
def _schema() -> type[BaseModel]:
    # Built on first use, not at import: `hpd train --help` reads only the dataclasses.
    return _model_of(Config)


def _problems(data: dict[str, Any], strict: bool) -> tuple[Any, list[str]]:
    """Validate a nested plain dict against the schema: (the validated model or None, messages).

    strict: types must already be right (a config built in Python); otherwise pydantic converts
    (``'1e-3'`` -> 0.001, ``'yes'`` -> True, 30.0 -> 30), after `_prepare` has applied our own rules.
    """
    from pydantic import ValidationError

    try:
        return _schema().model_validate(data, strict=strict), []
    except ValidationError as e:
        return None, [_message(err) for err in e.errors()]


def _message(err: Any) -> str:
    """One pydantic error -> our one-line message naming the dotted key, the rule and the value."""
    # An item of a list field is located by its index: the message names the field.
    key = ".".join(str(part) for part in err["loc"] if not isinstance(part, int))
    kind, value = err["type"], err["input"]
    tp, meta = _field_of(key)
    if kind == "less_than_equal" and meta.get("max") is None:
        return f"{key}: must be at most {INT_MAX} (an int64), got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "choice", "literal_error"):
        msg = f"{key}: must be {_describe_checks(meta)}, got {value!r}"
        hint = _suggest(str(value), [str(c) for c in meta["choices"]]) if "choices" in meta else None
        return msg + (f" (did you mean {hint!r}?)" if hint else "")
    if kind == "string_pattern_mismatch" and tp is Any:  # a key of a mapping field (teacher.named)
        return f"{key.rpartition('.')[0]}: {value!r} is not a name (letters, digits, '_', '.', '-'; a letter or digit first)"
    if kind == "string_pattern_mismatch":
        return f"{key}: must not be empty"
    if kind == "extra_forbidden":
        parent = key.rpartition(".")[0]
        return f"{key}: unknown key; {parent} takes {', '.join(sorted(_mapping_keys(parent)))}"
    if kind == "finite_number":
        return f"{key}: expected a finite float, got {value!r}"
    if kind == "value_error":
        return f"{key}: {err['ctx']['error']}"
    if kind in ("model_type", "dataclass_type"):
        return f"{key}: expected a mapping of {key}.* keys, got {value!r}"
    return str(_type_error(key, tp, value))


def _field_of(key: str) -> tuple[Any, dict[str, Any]]:
    """(type, metadata) of a dotted key (an entry of a mapping field: `teacher.named.NAME.path`, its
    value's field)."""
    found = _field_table().get(key)
    if found is None and (parent := _mapping_field(key)) is not None:
        rest = key[len(parent) + 1:].split(".")
        value_t = typing.get_args(_split_optional(_field_table()[parent][0])[0])[1]
        if len(rest) == 2 and rest[1] in _hints(value_t):
            f = next(f for f in dataclasses.fields(value_t) if f.name == rest[1])
            return _hints(value_t)[rest[1]], dict(f.metadata)
    return found or (Any, {})


def _mapping_field(key: str) -> str | None:
    """The mapping field (`teacher.named`) that a longer dotted key lies under, else None."""
    for k, (tp, _meta) in _field_table().items():
        if key.startswith(k + ".") and typing.get_origin(_split_optional(tp)[0]) is dict:
            return k
    return None


def mapping_fields() -> list[str]:
    """The dotted keys of the fields whose value is a mapping of names (`teacher.named`): compared,
    saved and shown as one value."""
    return [k for k, (tp, _meta) in _field_table().items() if typing.get_origin(_split_optional(tp)[0]) is dict]


def _mapping_keys(parent: str) -> list[str]:
    """The keys of one entry of the mapping field that `parent` (`teacher.named.NAME`) lies in."""
    field_key = _mapping_field(parent)
    if field_key is None:
        return []
    return [f.name for f in dataclasses.fields(typing.get_args(_split_optional(_field_table()[field_key][0])[0])[1])]


def _type_error(key: str, tp: Any, value: Any) -> HPDError:
    inner, optional = _split_optional(tp)
    article = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}
    what = article.get(inner, getattr(inner, "__name__", str(inner)))
    if typing.get_origin(inner) is list:
        what = "a list ([a, b] in YAML, a,b in an override)"
    if optional:
        what += " or null"
    return HPDError(f"{key}: expected {what}, got {value!r}")


def _prepare(key: str, value: Any, raw: str | None) -> Any:
    """Our reading of a YAML / override value where it differs from pydantic's lax conversion.

    raw: the override's text after '=' (None for values from a file or a dict).
    """
    tp, meta = _field_of(key)
    inner, optional = _split_optional(tp)
    # 'none' is a word only for optional fields: teacher.path=none stays the string 'none'.
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if inner is str and value is not None:
        if raw is not None:
            # Overrides: take the text as typed (`output_dir=2024` stays '2024', `tensorboard=off`
            # stays 'off'), unless it was quoted on purpose.
            text = raw.strip()
            return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted on/off/yes/no as booleans (`tensorboard: off`,
            # `mixed_precision: no`): map them back to the word when it is one of the choices.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            for word in words:
                if word in meta.get("choices", ()):
                    return word
            raise HPDError(
                f"{key}: expected a string, got {value!r} (YAML reads unquoted yes/no/on/off as "
                f"booleans: quote the value)"
            )
        return str(value) if isinstance(value, (int, float)) else value
    if typing.get_origin(inner) is list:
        # `log.report_to=wandb,mlflow` (or a YAML string): comma-separated items
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
    if inner in (int, float) and isinstance(value, bool):
        raise _type_error(key, tp, value)  # pydantic reads True as 1; a step count never is
    if inner is int and isinstance(value, str):
        try:  # '1e3' -> 1000 (YAML 1.1 reads an exponent without a dot as a string)
            number = float(value)
        except ValueError:
            return value
        return int(number) if math.isfinite(number) and number.is_integer() else value
    if inner is float and isinstance(value, int):
        return float(value)  # so that range messages show 0.0, as the value will be stored
    return value


# --------------------------------------------------------------------------------------------
# Setting values
# --------------------------------------------------------------------------------------------


def _unknown_key(key: str, where: str) -> HPDError:
    spellings = _alias_spellings()
    hint = _suggest(key, [*_all_keys(), *spellings])
    hint = spellings.get(hint, hint)  # a close alias points at the key it stands for
    msg = f"unknown config key {key!r}{where}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    return HPDError(msg + " `hpd train --help` lists every key")


# --------------------------------------------------------------------------------------------
# Aliases: the names Hugging Face users type
# --------------------------------------------------------------------------------------------

# TrainingArguments' names -> our keys. Each is accepted on its own (`learning_rate: 3e-4`,
# `learning_rate=3e-4`) and inside the section of its key (`optim.learning_rate`). An alias whose
# key this version lacks is refused by name.
ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "per_device_train_batch_size": "optim.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "lr_scheduler_type": "optim.schedule",
    "gradient_checkpointing": "student.gradient_checkpointing",
    "num_train_epochs": "epochs",
    "logging_steps": "log.every",
    "eval_steps": "log.eval_every",
    "report_to": "log.report_to",
    "save_steps": "save.every",
    "save_total_limit": "save.keep_last",
}

# Names we refuse with the reason, since no key means the same.
_NOT_ALIASES: dict[str, str] = {}


@functools.cache
def _alias_spellings() -> dict[str, str]:
    """Every accepted spelling of an alias (bare, and dotted under its key's section) -> its key."""
    out: dict[str, str] = {}
    for alias, key in ALIASES.items():
        out[alias] = key
        section = key.rpartition(".")[0]
        if section:
            out[f"{section}.{alias}"] = key
    return out


def _canonical(key: str, where: str) -> str:
    """The config key that `key` names: itself, or the key of an alias (HPDError for an alias
    this version has no key for, or a refused name)."""
    if key in _field_table():
        return key
    target = _alias_spellings().get(key)
    if target is None:
        reason = _NOT_ALIASES.get(key.rpartition(".")[2])
        if reason:
            raise HPDError(f"{key!r}{where}: {reason}")
        return key
    if target not in _field_table():
        raise HPDError(f"{key!r}{where} stands for {target!r}, which this version of hpd does not have")
    return target


def _same_value(a: Any, b: Any) -> bool:
    """Whether two values read from YAML mean the same (`3e-4` is a string in YAML 1.1, 0.0003 a float)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _set(data: dict[str, Any], key: str, value: Any, *, raw: str | None = None, where: str = "",
         seen: dict[str, tuple[str, Any]] | None = None) -> None:
    """Set the dotted `key` (or an alias of one) of the nested plain dict `data` (a config's
    values) to `value`.

    seen: canonical key -> (spelling, value) of what this layer (one file, or the overrides) set
    so far; a key set under two spellings (an alias and its key) to different values is an error.
    """
    sections = _sections()
    if key in sections:
        example = f"{key}.{dataclasses.fields(sections[key])[0].name}"
        raise HPDError(
            f"{key!r} is a section, not a value{where}: set its keys one by one, e.g. {example}=..."
        )
    spelled, key = key, _canonical(key, where)
    parent = _mapping_field(key) if key not in _all_keys() else None
    if parent is not None:  # teacher.named.NAME.path=DIR: one entry's key
        section, _, leaf = parent.rpartition(".")
        name, _, sub = key[len(parent) + 1:].partition(".")
        if not sub or "." in sub:
            raise HPDError(f"{key!r}{where}: set one key of one entry, e.g. {parent}.NAME.{_mapping_keys(parent + '.x')[0]}=...")
        entries = (data[section] if section else data).setdefault(leaf, {})
        if not isinstance(entries.get(name, {}), dict):
            entries[name] = dataclasses.asdict(entries[name])
        entries.setdefault(name, {})[sub] = _prepare(key, value, raw)
        return
    if key not in _all_keys():
        raise _unknown_key(key, where)
    if seen is not None:
        before = seen.get(key)
        if before is not None and before[0] != spelled and not _same_value(before[1], value):
            raise HPDError(f"{before[0]!r} ({before[1]!r}) and {spelled!r} ({value!r}) both set {key!r}{where}: "
                           f"keep one of them")
        seen[key] = (spelled, value)
    section, _, leaf = key.rpartition(".")
    (data[section] if section else data)[leaf] = _prepare(key, value, raw)


def _flatten(d: Any, where: str) -> list[tuple[str, Any]]:
    """Nested mapping -> [(dotted_key, value)]; sections must be mappings."""
    if d is None:
        return []
    if not isinstance(d, dict):
        raise HPDError(
            f"config{where} must be a mapping of keys to values (like `max_steps: 20`), "
            f"got {type(d).__name__}"
        )
    sections = _sections()
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        k = str(k)
        if k in sections:
            if v is None:
                continue  # an empty section (`optim:`) keeps the defaults
            if not isinstance(v, dict):
                raise HPDError(
                    f"{k}: expected a mapping of {k}.* keys "
                    f"(e.g. `{k}:` then indented `key: value` lines), got {v!r}{where}"
                )
            for sk, sv in v.items():
                if isinstance(sv, dict) and _mapping_field(f"{k}.{sk}.x") != f"{k}.{sk}":
                    raise _unknown_key(f"{k}.{sk}.{next(iter(sv), '')}".rstrip("."), where)
                items.append((f"{k}.{sk}", sv))
        elif isinstance(v, dict):
            raise _unknown_key(k, where)
        else:
            items.append((k, v))
    return items


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


# The objectives that work across tokenizers (teacher.cross_tokenizer=true): those that read the
# teacher at the student's own tokens (per aligned text span), and ULD.
XTOK_OBJECTIVES = ("hpd", "orkl", "sft", "uld")


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one field."""
    problems: list[str] = []
    no_teacher = cfg.teacher.path.strip().lower() == "none"
    self_regime = cfg.regime.name == "self"
    if cfg.teacher.cache is not None and cfg.regime.name != "dataset":
        problems.append(
            f"teacher.cache holds the teacher on the data's sequences only, but regime.name is "
            f"{cfg.regime.name!r} (new sequences need the teacher itself): use regime.name=dataset, "
            f"or set teacher.cache=null"
            + (". For teacher-generated data with a cache, write it once with `hpd generate --model TEACHER "
               "--prompts FILE --out GEN.jsonl`, cache it with `hpd cache-teacher --data GEN.jsonl`, and train "
               "on GEN.jsonl with regime.name=dataset" if cfg.regime.name == "teacher" else "")
        )
    served = cfg.teacher.server is not None
    if served:
        for bad, why in ((cfg.teacher.cache is not None, "teacher.cache is set too: choose one"),
                         (self_regime, "regime.name=self: the student is its own teacher"),
                         (cfg.regime.name == "teacher" or (cfg.regime.name == "mixed" and cfg.regime.off_policy == "teacher"),
                          "teacher generations need the teacher model here: use regime.name=dataset or student"),
                         (cfg.student.init_from_teacher is not None, "student.init_from_teacher needs the teacher's weights"),
                         (cfg.objective.temperature != 1.0, "a server returns log-probabilities at temperature 1: "
                                                             "set objective.temperature=1"),
                         # the exact scorer reads positions of the padded rows, not of a packed batch
                         (cfg.teacher.server_exact_samples and cfg.data.packing,
                          "teacher.server_exact_samples does not work with data.packing yet: set one of them to false")):
            if bad:
                problems.append(f"teacher.server ({cfg.teacher.server}): {why}")
    needs_teacher = objective_class(cfg.objective.name).needs_teacher
    if no_teacher and needs_teacher and cfg.teacher.cache is None and not self_regime and not served and not cfg.teacher.named:
        problems.append(
            f"teacher.path: 'none' is allowed only with objective.name=sft, teacher.cache or regime.name=self "
            f"(objective.name is {cfg.objective.name!r}); name a teacher model, set teacher.cache, or use sft"
        )
    if self_regime and not no_teacher:
        problems.append(
            f"regime.name=self: the student is its own teacher, but teacher.path is "
            f"{cfg.teacher.path!r}; set teacher.path=none"
        )
    if self_regime and not needs_teacher:
        problems.append(
            "regime.name=self with objective.name=sft: sft never reads the teacher; for SFT on "
            "the reference solutions use regime.name=dataset with data.completion_field set to them"
        )
    if cfg.teacher.cross_tokenizer:
        if cfg.objective.name not in XTOK_OBJECTIVES:
            problems.append(
                f"teacher.cross_tokenizer=true: objective '{cfg.objective.name}' needs one vocabulary for both "
                f"models; across tokenizers use one of {', '.join(XTOK_OBJECTIVES)} (uld for a vocabulary-sized loss)"
            )
        if cfg.teacher.cache is None and (no_teacher or cfg.teacher.path.strip() == "tiny") and served:
            problems.append("teacher.cross_tokenizer=true with teacher.server tokenizes the teacher's sequences here: "
                            "set teacher.path to a directory holding the served teacher's tokenizer")
        elif cfg.teacher.cache is None and no_teacher and not served:
            problems.append("teacher.cross_tokenizer=true needs a teacher: teacher.path, teacher.cache (built with "
                            "`hpd cache-teacher --student DIR`) or teacher.server")
        if cfg.regime.name not in ("dataset", "student"):
            problems.append(
                f"teacher.cross_tokenizer=true works with regime.name dataset or student, not {cfg.regime.name!r}: "
                "write teacher answers once with `hpd generate --model TEACHER` and train on them with regime.name=dataset"
            )
        if cfg.student.init_from_teacher is not None:
            problems.append("teacher.cross_tokenizer=true: student.init_from_teacher builds the student with the "
                            "teacher's tokenizer; load a student of its own tokenizer instead")
    template = cfg.opsd.teacher_template
    for slot in ("{privileged}", "{prompt}"):
        if self_regime and template.count(slot) != 1:
            problems.append(
                f"opsd.teacher_template must hold {slot} exactly once, got {template!r}"
            )
    if no_teacher and (
        cfg.regime.name == "teacher"
        or (cfg.regime.name == "mixed" and cfg.regime.off_policy == "teacher")
    ):
        problems.append(
            "regime: teacher generations need a teacher, but teacher.path is 'none'; "
            "name a teacher model or use regime.name=dataset"
        )
    init = cfg.student.init_from_teacher
    if init is not None and no_teacher:
        problems.append(
            f"student.init_from_teacher ({init!r}) builds the student from the teacher, but "
            "teacher.path is 'none'; name a teacher model or set student.init_from_teacher=null"
        )
    if init is not None and cfg.teacher.cache is not None:
        problems.append(
            f"student.init_from_teacher ({init!r}) needs the teacher's weights, but with teacher.cache "
            "set the teacher is never loaded: build the student once with "
            "hpd.models.from_teacher.save_student_from_teacher(TEACHER, LAYERS, DIR) and pass DIR as student.path"
        )
    if init is not None and cfg.student.path not in ("tiny", "teacher"):
        problems.append(
            f"student.path ({cfg.student.path!r}) and student.init_from_teacher ({init!r}) both "
            "say where the student comes from: set student.path=teacher, or "
            "student.init_from_teacher=null to load student.path"
        )
    if init is None and cfg.student.path == "teacher":
        problems.append(
            "student.path=teacher needs student.init_from_teacher, the teacher layers to keep "
            "(e.g. every:3, spread:10, or 0,5,9)"
        )
    for section in ("student", "teacher"):
        model: ModelConfig = getattr(cfg, section)
        if model.path == "tiny" and model.tiny_hidden % model.tiny_heads:
            problems.append(
                f"{section}.tiny_hidden ({model.tiny_hidden}) must be divisible by "
                f"{section}.tiny_heads ({model.tiny_heads})"
            )
        h, i = model.tiny_hidden, model.tiny_intermediate
        n = model.tiny_layers * (4 * h * h + 3 * h * i) + 2 * 512 * h  # attention, MLP, embeddings and head
        if model.path == "tiny" and n > TINY_MAX_PARAMETERS:
            problems.append(
                f"{section}: the 'tiny' model of tiny_layers={model.tiny_layers}, tiny_hidden={h}, "
                f"tiny_intermediate={i} would have about {n:.2g} parameters (at most {TINY_MAX_PARAMETERS:.0g}): "
                "make it smaller, or load a real model with path=DIR"
            )
    problems += _reuse_checks(cfg)
    problems += _named_checks(cfg)
    report_to = cfg.log.report_to
    if "none" in report_to and len(set(report_to)) > 1:
        problems.append(f"log.report_to: 'none' means no tracker, but it lists {report_to}: give 'none' alone, "
                        "or the trackers without it")
    if "tensorboard" in report_to and cfg.log.tensorboard == "off":
        problems.append("log.report_to lists tensorboard but log.tensorboard is off: drop one of them")
    if len(set(report_to)) != len(report_to):
        problems.append(f"log.report_to lists a tracker twice: {report_to}")
    if cfg.data.eval is not None and cfg.data.eval_fraction > 0:
        problems.append(
            f"data.eval_fraction ({cfg.data.eval_fraction}) splits train only when data.eval is "
            f"null, but data.eval is {cfg.data.eval!r}; set one of them"
        )
    return problems


def _named_checks(cfg: Config) -> list[str]:
    """A teacher per row (teacher.named): each entry one source, and what routing does not combine with."""
    named, problems = cfg.teacher.named, []
    if not named:
        return problems
    for name, t in named.items():
        given = [k for k in ("path", "cache", "server") if getattr(t, k) is not None]
        if len(given) != 1:
            problems.append(f"teacher.named.{name}: give exactly one of path, cache or server, got "
                            f"{', '.join(given) or 'none'}")
        elif t.path is not None and t.path.strip().lower() in ("tiny", "none"):
            problems.append(f"teacher.named.{name}.path: {t.path!r} is not a model; name a model directory or Hub id")
        if t.cache is not None and cfg.regime.name != "dataset":
            problems.append(f"teacher.named.{name}.cache holds the teacher on the data's sequences only, but "
                            f"regime.name is {cfg.regime.name!r}: use regime.name=dataset")
        if t.server is not None and cfg.objective.temperature != 1.0:
            problems.append(f"teacher.named.{name}.server: a server returns log-probabilities at temperature 1: "
                            "set objective.temperature=1")
    if "default" in named:
        problems.append("teacher.named: 'default' names the teacher of the teacher section (path, cache or "
                        "server), the one of rows without a teacher; call this one otherwise")
    if any(t.server is not None for t in named.values()) and cfg.teacher.server_exact_samples and cfg.data.packing:
        problems.append("teacher.named: teacher.server_exact_samples does not work with data.packing yet: set one "
                        "of them to false")
    for bad, why in ((cfg.regime.name == "self", "regime.name=self: the student is its own teacher"),
                     (cfg.regime.name == "teacher" or (cfg.regime.name == "mixed" and cfg.regime.off_policy == "teacher"),
                      "teacher generations would come from one teacher: write each teacher's answers with `hpd "
                      "generate` and train on them with regime.name=dataset"),
                     (cfg.teacher.cross_tokenizer, "teacher.cross_tokenizer=true: every teacher must share the "
                                                   "student's tokenizer"),
                     (cfg.data.streaming, "data.streaming=true: the rows' teachers are read with the data at start; "
                                          "set data.streaming=false")):
        if bad:
            problems.append(f"teacher.named ({', '.join(named)}) does not work with {why}")
    return problems


def _reuse_checks(cfg: Config) -> list[str]:
    """Rollout reuse (regime.minibatches x regime.epochs > 1) and its clip range."""
    r, problems = cfg.regime, []
    if 0 < r.dual_clip <= 1:
        problems.append(f"regime.dual_clip must be > 1 (or 0 = off), got {r.dual_clip}")
    if r.minibatches * r.epochs == 1:
        return problems
    rollouts = r.name == "student" or (r.name == "self" and cfg.opsd.response == "rollout")
    if not rollouts:
        problems.append(
            f"regime.minibatches={r.minibatches} regime.epochs={r.epochs} reuse student rollouts, but "
            f"regime.name={r.name!r}{' with opsd.response=reference' if r.name == 'self' else ''} has none"
            f"{' (mixed draws its regime per step)' if r.name == 'mixed' else ''}: use regime.name=student "
            "(or self with opsd.response=rollout), or set both to 1")
    if objective_class(cfg.objective.name).support == "vocab":
        problems.append(
            f"regime.minibatches/epochs > 1 clip the ratio of sampled tokens, but objective.name="
            f"{cfg.objective.name!r} weighs the whole vocabulary: reuse rollouts with orkl or hpd, or set "
            "regime.minibatches=1 regime.epochs=1")
    return problems


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise HPDError(problems[0])
    if problems:
        raise HPDError(f"{len(problems)} config problems:\n  " + "\n  ".join(problems))


def validate(cfg: Config) -> Config:
    """Check every field against its type and checks (strictly: no conversion), plus the
    cross-field rules.

    Raises HPDError listing every problem (each names its dotted key). Returns `cfg`.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"validate() expects a Config, got {type(cfg).__name__}")
    _raise([f"{f.name}: expected a {tp.__name__}, got {getattr(cfg, f.name)!r}"
            for f, tp in _top_fields() if _is_section(tp) and not isinstance(getattr(cfg, f.name), tp)])
    _raise(_problems(config_to_dict(cfg), strict=True)[1])
    _raise(_cross_checks(cfg))  # they assume well-typed fields
    return cfg


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any, str]:
    if "=" not in text:
        raise HPDError(
            f"override {text!r} must look like key=value, e.g. optim.lr=3e-4 or max_steps=20"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise HPDError(f"override {text!r} has no key before '=', e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own (e.g. 'a: b'): let the field type decide
    return key, value, raw


def _build(d: Any, where: str, overrides: Iterable[str]) -> Config:
    """Defaults <- the mapping `d` <- the overrides, converted and checked by the schema."""
    data = config_to_dict(Config())
    seen: dict[str, tuple[str, Any]] = {}
    for key, value in _flatten(d, where):
        _set(data, key, value, where=where, seen=seen)
    seen = {}  # an override replaces what the file set, under any spelling
    for text in overrides:
        key, value, raw = _parse_override(text)
        _set(data, key, value, raw=raw, where=f" (in override {text!r})", seen=seen)
    model, problems = _problems(data, strict=False)
    _raise(problems)
    values = model.model_dump()
    sections = {name: cls(**values.pop(name)) for name, cls in _sections().items()}
    return validate(Config(**values, **sections))


def config_from_dict(d: dict[str, Any] | None, overrides: Iterable[str] = ()) -> Config:
    """Build and validate a Config from a (nested or dotted-key) mapping plus overrides."""
    return _build(d, "", overrides)


def load_config(path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file (None = defaults), apply ``key=value`` overrides, validate.

    Raises HPDError for a missing/malformed file, an unknown key (with the closest valid key),
    a value of the wrong type, out of range or not among the choices.
    """
    data, where = None, ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HPDError(
                f"config file '{p}' not found; pass the path of a YAML file "
                f"(`hpd config --out {p}` writes a default one)"
            )
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise HPDError(f"config file '{p}' is not valid YAML: {e}") from None
        if data is None:
            raise HPDError(
                f"config file '{p}' is empty (no settings): write the keys you want in it "
                f"(`hpd config --out {p}` writes a default one)"
            )
        where = f" (in {p})"
    return _build(data, where, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested dict of plain values (sections -> dicts)."""
    return dataclasses.asdict(cfg)


def _yaml_scalar(value: Any) -> str:
    # Dump inside a flow list so YAML quotes what needs quoting ('on', '1e-3' strings...) and no
    # document-end marker is added; then strip the brackets.
    if isinstance(value, dict):  # a mapping field's entries (teacher.named) as plain mappings
        value = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in value.items()}
    text = yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()
    return text[1:-1]


def _to_yaml(cfg: Config, comments: bool = False) -> str:
    if not comments:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    lines = [
        "# hpd run config. Every key is optional (defaults shown); override any with key=value,",
        "# e.g. `hpd train this.yaml optim.lr=3e-4 max_steps=20`. `hpd train --help` explains all.",
    ]
    current_section = None
    for key, f, _tp, value in iter_fields(cfg):
        section, _, leaf = key.rpartition(".")
        if section and section != current_section:
            current_section = section
            lines += ["", f"{section}:  # {_sections()[section].__doc__.strip()}"]
        indent = "  " if section else ""
        checks = _describe_checks(f.metadata)
        comment = f.metadata["help"] + (f" ({checks})" if checks else "")
        lines += textwrap.wrap(
            comment, width=96, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   "
        )
        lines.append(f"{indent}{leaf}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | os.PathLike[str], comments: bool = False) -> Path:
    """Write the config as YAML atomically (temp file + rename: never a half-written file)."""
    from hpd.files import atomic_write_text

    return atomic_write_text(path, _to_yaml(cfg, comments=comments))


def config_help(width: int = 88) -> str:
    """A plain-text reference of every config key: dotted key, type, default, allowed values, help.

    Printed by `hpd train --help`; line breaks are meant to be kept as they are.
    """
    lines = [
        "Config keys (YAML file sections, or key=value overrides such as optim.lr=3e-4 or",
        "max_steps=20; null/none sets an optional key to None):",
    ]
    current = None
    for key, f, tp, value in iter_fields():
        section = key.rpartition(".")[0] or "top level"
        if section != current:
            current = section
            if section == "top level":
                lines += ["", "top level:"]
            else:
                doc = _sections()[section].__doc__.strip().rstrip(".")
                lines += ["", f"{section}:  {doc}"]
        checks = _describe_checks(f.metadata)
        default = "null" if value is None else _yaml_scalar(value)
        head = f"  {key}  ({_type_name(tp)}, default {default}{'; ' + checks if checks else ''})"
        lines.append(head)
        lines += textwrap.wrap(
            f.metadata["help"], width=width, initial_indent="      ", subsequent_indent="      "
        )
    lines += ["", "Hugging Face names (aliases): each is accepted for its key, on its own or under the key's",
              "section (learning_rate=3e-4 or optim.learning_rate=3e-4); setting both to different values",
              "is an error."]
    lines += [f"  {alias}  ->  {key}" for alias, key in ALIASES.items() if key in _field_table()]
    return "\n".join(lines)
