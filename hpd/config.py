"""Typed run configuration: flat dataclasses, YAML files and ``key=value`` overrides.

Over 600 lines: one flat dataclass per config section, each key with its help text and range
(the command line, the YAML reference and the checks are derived from them); the machinery that
reads them lives in `hpd.configuration`, this module is the sections and the entry points.

A run is described by one `Config`: a few top-level fields plus one flat section per concern
(`student`, `teacher`, `data`, `objective`, `regime`, `optim`, `log`, `save`). Every field carries
its help text and its allowed values in the dataclass field metadata (`field_`), so one generic
`validate()` checks everything and `config_help()` documents everything from the same source (it is
what `hpd train --help` prints).

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

Where each part lives: the field tables and `field_` in `hpd.configuration.fields`; the conversion
and range checks on pydantic v2 (a model derived from these dataclasses) in
`hpd.configuration.schema`; keys, aliases (`hpd.configuration.keys.ALIASES`), overrides and YAML
files in `hpd.configuration.keys`; the rules across sections in `hpd.configuration.checks`; the
YAML written and the help text in `hpd.configuration.render`. The dataclasses stay plain, so a
`Config` is built, compared and edited as any dataclass.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from hpd.configuration import keys, render
from hpd.configuration.checks import cross_checks
from hpd.configuration.fields import field_, is_section, top_fields
from hpd.configuration.fields import iter_fields as _iter_fields
from hpd.configuration.fields import mapping_fields as _mapping_fields
from hpd.configuration.schema import problems, raise_problems
from hpd.objectives import OBJECTIVES, Param, config_params, param_fields

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
    "validate",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "config_help",
    "iter_fields",
    "mapping_fields",
]

# Derived from the objectives' registry (`hpd.objectives.OBJECTIVES`), where each objective
# declares its parameters once: the names, and each objective's parameters -> their config fields.
OBJECTIVE_NAMES = tuple(OBJECTIVES)
OBJECTIVE_PARAM_FIELDS: dict[str, dict[str, str]] = {n: param_fields(c) for n, c in OBJECTIVES.items() if c.params}


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
        return render.to_yaml(self, comments=comments)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def iter_fields(cfg: Config | None = None) -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """Yield ``(dotted_key, field, type, value)`` for every leaf field, in declaration order.

    With ``cfg=None`` the values are the defaults.
    """
    return _iter_fields(Config, cfg)


def mapping_fields() -> list[str]:
    """The dotted keys of the fields whose value is a mapping of names (`teacher.named`): compared,
    saved and shown as one value."""
    return _mapping_fields(Config)


def validate(cfg: Config) -> Config:
    """Check every field against its type and checks (strictly: no conversion), plus the
    cross-field rules.

    Raises HPDError listing every problem (each names its dotted key). Returns `cfg`.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"validate() expects a Config, got {type(cfg).__name__}")
    raise_problems([f"{f.name}: expected a {tp.__name__}, got {getattr(cfg, f.name)!r}"
                    for f, tp in top_fields(Config) if is_section(tp) and not isinstance(getattr(cfg, f.name), tp)])
    raise_problems(problems(Config, config_to_dict(cfg), strict=True)[1])
    raise_problems(cross_checks(cfg))  # they assume well-typed fields
    return cfg


def config_from_dict(d: dict[str, Any] | None, overrides: Iterable[str] = ()) -> Config:
    """Build and validate a Config from a (nested or dotted-key) mapping plus overrides."""
    return validate(keys.build(Config, d, "", overrides))


def load_config(path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file (None = defaults), apply ``key=value`` overrides, validate.

    Raises HPDError for a missing/malformed file, an unknown key (with the closest valid key),
    a value of the wrong type, out of range or not among the choices.
    """
    data, where = keys.read_file(path) if path is not None else (None, "")
    return validate(keys.build(Config, data, where, overrides))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested dict of plain values (sections -> dicts)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike[str], comments: bool = False) -> Path:
    """Write the config as YAML atomically (temp file + rename: never a half-written file)."""
    from hpd.files import atomic_write_text

    return atomic_write_text(path, render.to_yaml(cfg, comments=comments))


def config_help(width: int = 88) -> str:
    """A plain-text reference of every config key: dotted key, type, default, allowed values, help.

    Printed by `hpd train --help`; line breaks are meant to be kept as they are.
    """
    return render.config_help(Config, width)
