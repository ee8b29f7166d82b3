"""`hpd train`: distill a teacher into a student, on one CPU or under `accelerate`.

One optimizer step, top to bottom:

    checkpoint / evaluate when due
    responses: the run's `ResponseSource` (`hpd.responses.regimes`: dataset | teacher | student | self |
      mixed) names the step's regime and gives each micro-batch's completions (rollouts sampled
      through a `hpd.responses.rollout.GenerationBackend`)
      [rollout reuse, regime.minibatches x epochs > 1: a new rollout batch every M x E steps, its
      objective weights fixed then (`DistillationLoss(fix_weights=True)`); the steps between
      train on their share of it through the PPO-clipped weights (`hpd.objectives.clip`)]
    this process's micro-batches (`hpd.data.batches.MicroBatch`), each prepared by the run's
      `TeacherSource` (`hpd.teachers`: a teacher model, a top-K cache, or the OPSD self-teacher)
    global count N of active tokens over all micro-batches and processes
    per micro-batch: teacher view (no grad) -> student forward + objective (chunked) -> backward
    clip, skip the step if the loss or gradient is not finite, optimizer + scheduler step, then
      the sources' per-step hooks (generation backend weight sync, the self-teacher's EMA)
    log: loss terms, objective metrics, agreement / KL / entropy, grad norm, lr, tokens/s

The step never asks which regime or which kind of teacher it runs: `_setup` builds the two
sources from the config once.

Everything random is a pure function of (seed, step, micro-batch, rank) or of a state saved in the
checkpoint, so a killed run resumed from its last checkpoint ends with the weights an
uninterrupted run would have.

    >>> from hpd.config import load_config
    >>> from hpd.trainer import train
    >>> cfg = load_config("configs/tiny.yaml", ["output_dir=/tmp/hpd-doc", "max_steps=2", "log.progress=false"])
    >>> run_dir = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hpd.data.batches import MicroBatch, make_batch
from hpd.checkpoint import (
    STATE, clean_leftovers, latest_checkpoint, load_rng_state, load_student_weights, load_trainer_state, resolve_resume,
    load_state, save_checkpoint, save_state, space_error,
)
from hpd.config import Config, config_to_dict, load_config, save_config
from hpd.data.rows import EncodedExample, EpochSampler, encode_file, encode_self_distillation, load_examples
from hpd.distributed import (
    check_supported, is_fsdp, load_local_state, local_numel, local_state, make_accelerator, place_teacher, shard_name,
)
from hpd.errors import DivergedError, HPDError
from hpd.models.model_card import model_card
from hpd.models.hub import resolve_model_path
from hpd.data.packing import check_packing
from hpd.progress import Progress
from hpd.data.streaming import StreamSampler, check_streaming
from hpd.provenance import code_record
from hpd.models.loading import (
    apply_lora, enable_gradient_checkpointing, final_hidden_states, init_from_teacher, lm_head_of, load_model, model_inputs, save_model, vocab_rows,
)
from hpd.objectives import (
    COMMON_PARAMS, DEFAULT_CHUNK_SIZE, Objective, ObjectiveOutput, RatioClip, RolloutWeights, TeacherView,
    objective_class, param_fields, rollout_weights,
)
from hpd.responses.regimes import ResponseSource, derive_seed, has_rollouts, response_source, rollout_bias
from hpd.responses.backends import select_backend
from hpd.schedule import lr_lambda
from hpd.resume import RUN_NEUTRAL_KEYS, check_changes, config_changes, record_history, saved_config, schedule_note
from hpd.metrics_file import MetricsLog
from hpd.run_dir import RunDirLock, check_run_paths, describe_holder
from hpd.teachers.served import TeacherServers
from hpd.teachers.cache import TeacherCache
from hpd.teachers.cross_tokenizer import CrossTokenizerTeacher
from hpd.teachers.sources import (
    CachedTeacher, ModelTeacher, OPSDTeacher, SelfTeacher, ServedTeacher, TeacherSource, prompt_ending_mismatches,
)
from hpd.trackers import finish_trackers, make_trackers, resolve_trackers, start_trackers, tracker_values
from hpd.vocab import resolve_shared_vocab, teacher_vocab_size


# --------------------------------------------------------------------------------------------
# The distillation step as a module, so DDP/FSDP wrap the student forward *and* the loss.
# --------------------------------------------------------------------------------------------


class DistillationLoss(nn.Module):
    """Student forward + objective for one micro-batch.

    The loss is computed inside `forward` so that data-parallel wrappers see every use of the
    student's parameters (the LM head is used by the chunked loss, not by the decoder).
    """

    def __init__(self, student: nn.Module, objective: Objective, *, chunk_size: int, vocab_size: int | None,
                 clip: RatioClip | None = None):
        super().__init__()
        self.student = student
        self.objective = objective
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size
        self.clip = clip
        if chunk_size > 0:  # refused now, by name, rather than at the first step
            lm_head_of(student, hint="set objective.chunk_size=0 (the loss then reads the student's own logits)")

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The student's decoder layer classes: FSDP's transformer auto-wrap shards each on its own
        (without this it finds none and wraps the whole run as one unit: no sharding)."""
        names = getattr(self.student, "_no_split_modules", None)
        return sorted(names) if names else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, teacher: Any, *,
                num_tokens: torch.Tensor, generator: torch.Generator | None, diagnostics: bool,
                rollout: RolloutWeights | None = None, fix_weights: bool = False,
                position_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """input_ids, attention_mask, labels: `(B, T)`; teacher: a `TeacherView` (or logits `(B, T, V)`) or None;
        position_ids: `(B, T)` of a packed batch (`hpd.data.packing`), else None.

        Reused rollouts: `fix_weights=True` (at rollout time, no gradient) returns the objective's
        weights under the current student as `{"rollout": RolloutWeights, "output": ...}`; a later
        step passes them back as `rollout` (teacher None) and gets their clipped PPO loss."""
        kw = dict(generator=generator, num_tokens=num_tokens, vocab_size=self.vocab_size, diagnostics=diagnostics)
        if fix_weights:
            with torch.no_grad():
                hidden = final_hidden_states(self.student, input_ids, attention_mask, position_ids)
                fixed, out = rollout_weights(self.objective, hidden, lm_head_of(self.student), teacher, labels,
                                             chunk_size=self.chunk_size or DEFAULT_CHUNK_SIZE, **kw)
            return {"rollout": fixed, "output": out}
        if rollout is not None:
            kw.update(rollout=rollout, clip=self.clip)
        if self.chunk_size > 0:
            hidden = final_hidden_states(self.student, input_ids, attention_mask, position_ids)
            out = self.objective.chunked(hidden, lm_head_of(self.student), teacher, labels, chunk_size=self.chunk_size, **kw)
        else:
            logits = self.student(input_ids=input_ids, **model_inputs(attention_mask, position_ids), use_cache=False).logits
            out = self.objective(logits, teacher, labels, **kw)
        return {"loss": out.loss, "output": out}


# --------------------------------------------------------------------------------------------
# Set-up: everything is loaded and checked before the run directory is touched.
# --------------------------------------------------------------------------------------------


def resolve_mixed_precision(name: str) -> str:
    """optim.mixed_precision with `auto` resolved: bf16 on a CUDA GPU with bf16 support, else no."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far in MiB: GPU memory allocated on CUDA, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def objective_from_config(cfg: Config) -> Objective:
    """The objective the config's `objective` section names, with its parameters and the CE mix."""
    o = cfg.objective
    cls = objective_class(o.name)
    params = {name: getattr(o, name) for name in COMMON_PARAMS}
    # A user's objective may declare parameters the config has no field for: they keep their defaults.
    params.update({name: getattr(o, key) for name, key in param_fields(cls).items() if hasattr(o, key)})
    return cls(**params)


def _tiny_kwargs(m) -> dict[str, int]:
    return dict(arch=m.tiny_arch, num_layers=m.tiny_layers, hidden_size=m.tiny_hidden, num_heads=m.tiny_heads,
                intermediate_size=m.tiny_intermediate, max_positions=m.tiny_max_positions)


def load_models(cfg: Config, cache: TeacherCache | None = None, *, with_teacher_tokenizer: bool = False):
    """(student, teacher or None, tokenizer, shared vocabulary size), and the teacher's tokenizer
    last when `with_teacher_tokenizer` (None without a teacher model).

    With `teacher.cross_tokenizer` the two tokenizers may differ (a tiny student keeps its own
    byte-level one) and no vocabulary is shared: the loss runs over the student's.

    With a teacher `cache` the teacher is not loaded: a tiny student takes the cache's tokenizer,
    and the vocabulary is the one the cache is normalized over. With `teacher.server` it is not
    loaded either: the served model is checked against the student in `Trainer._setup`. The student is wrapped with LoRA
    adapters when `student.lora_rank > 0`. With `regime.name=self` there is no teacher model: the
    student is its own teacher (`hpd.teachers.sources.SelfTeacher`).
    """
    teacher, tokenizer = None, None
    if cache is not None:
        tokenizer = cache.tokenizer() if cfg.student.path == "tiny" else None
    elif cfg.teacher.server is None and cfg.teacher.path.strip().lower() != "none":
        seed = cfg.teacher.init_seed if cfg.teacher.init_seed is not None else derive_seed(cfg.seed, "teacher") % 2**31
        teacher, tokenizer = load_model(cfg.teacher.path, dtype=cfg.teacher.dtype, trust_remote_code=cfg.teacher.trust_remote_code,
                                        tiny=_tiny_kwargs(cfg.teacher) if cfg.teacher.path == "tiny" else None, seed=seed,
                                        role="teacher")
    seed = cfg.student.init_seed if cfg.student.init_seed is not None else cfg.seed
    if cfg.student.init_from_teacher is not None:
        student, s_tok = init_from_teacher(teacher, cfg.student.init_from_teacher, dtype=cfg.student.dtype), tokenizer
    else:
        own = cfg.student.path != "tiny" or cfg.teacher.cross_tokenizer
        student, s_tok = load_model(cfg.student.path, tokenizer=None if own else tokenizer,
                                    dtype=cfg.student.dtype, trust_remote_code=cfg.student.trust_remote_code,
                                    tiny=_tiny_kwargs(cfg.student) if cfg.student.path == "tiny" else None, seed=seed,
                                    role="student")
    vocab_size = None
    if cache is not None:
        cache.check_run(tokenizer=s_tok if s_tok is not tokenizer else None,
                        teacher_path=resolve_model_path(cfg.teacher.path, download=False)  # checked when at hand
                        if cfg.teacher.path not in ("tiny", "none") else None)
        rows = vocab_rows(student)
        shared = resolve_shared_vocab(rows, cache.vocab_size, len(s_tok)) if rows != cache.vocab_size else rows
        if shared != cache.vocab_size:
            raise HPDError(f"the teacher cache is normalized over {cache.vocab_size} tokens but the student shares "
                           f"{shared} with it: rebuild the cache with --vocab-size {shared}")
        vocab_size = cache.vocab_size
    # Heads whose logits hpd's hidden-state views cannot reproduce are refused here, by name: the
    # teacher's view is always its head; the student's only with the chunked loss.
    if teacher is not None:
        lm_head_of(teacher)
    if cfg.objective.chunk_size > 0:
        lm_head_of(student, hint="set objective.chunk_size=0 (the loss then reads the student's own logits)")
    if teacher is not None:
        # across tokenizers the two are lined up by byte offsets (hpd.teachers.cross_tokenizer): no shared vocabulary
        vocab_size = teacher_vocab_size(vocab_rows(student), vocab_rows(teacher), s_tok, tokenizer,
                                        student=f"the student ({cfg.student.path})",
                                        teacher=f"the teacher ({cfg.teacher.path})",
                                        cross_tokenizer=cfg.teacher.cross_tokenizer)
        teacher.requires_grad_(False).eval()
    if cfg.student.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    if cfg.student.lora_rank > 0:
        student = apply_lora(student, rank=cfg.student.lora_rank, alpha=cfg.student.lora_alpha,
                             dropout=cfg.student.lora_dropout, seed=derive_seed(seed, "lora") % 2**31)
    if with_teacher_tokenizer:
        return student, teacher, s_tok, vocab_size, tokenizer if teacher is not None else None
    return student, teacher, s_tok, vocab_size


def load_data(cfg: Config, tokenizer, teacher_tokenizer=None) -> tuple[list[EncodedExample], list[EncodedExample], dict[str, Any]]:
    """Encoded train and eval examples, and the counts worth logging (rows, skipped, truncated).

    With `teacher_tokenizer` (cross-tokenizer runs) each example also gets the teacher's own prompt.
    """
    d = cfg.data
    if cfg.regime.name == "self":
        # (question, privileged text) rows: the completion field is optional, the privileged one is not.
        kw = dict(prompt_field=d.prompt_field, completion_field=d.completion_field, messages_field=d.messages_field,
                  on_bad_row=d.on_bad_row, require_completion=False)
        o = cfg.opsd

        def encode(path):
            examples, stats = load_examples(path, **kw)
            return encode_self_distillation(examples, tokenizer, privileged_field=o.privileged_field,
                                            teacher_template=o.teacher_template, completion_field=d.completion_field,
                                            max_length=d.max_length, chat_template=d.chat_template,
                                            on_bad_row=d.on_bad_row, stats=stats), stats
    else:
        def encode(path):
            return encode_file(path, tokenizer, d, teacher_tokenizer=teacher_tokenizer)

    if d.streaming:  # read as training goes (hpd.data.streaming.StreamSampler)
        train, info = [], {"train_streaming": True}
    else:
        train, stats = encode(d.train)
        info = {"train_rows": stats.rows, "train_skipped": stats.skipped, "train_truncated": stats.truncated,
                "skip_reasons": stats.skip_reasons[:5]}
    evals: list[EncodedExample] = []
    if d.eval:
        evals, es = encode(d.eval)
        info.update(eval_rows=es.rows, eval_skipped=es.skipped, eval_truncated=es.truncated)
    elif d.eval_fraction > 0:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "eval-split"))
        order = torch.randperm(len(train), generator=g).tolist()
        n_eval = max(1, int(round(len(train) * d.eval_fraction)))
        if n_eval >= len(train):
            raise HPDError(f"data.eval_fraction={d.eval_fraction} leaves no training rows out of {len(train)}")
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in sorted(order[n_eval:])]
        info.update(eval_rows=len(evals))
    return train, evals, info


def make_optimizer(cfg: Config, student: nn.Module):
    decay, no_decay = [], []
    for p in student.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the update of all tensors in one pass (the per-tensor loop was ~15% of a
    # SmolLM2 student's CPU step); it is what HF's Trainer uses by default too.
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                            fused=cfg.optim.fused_adamw or None)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return opt, sched


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def global_metrics(outputs: list[ObjectiveOutput], accelerator) -> dict[str, float]:
    """Token-weighted metrics over this step's micro-batches on every process."""
    local: dict[str, list[float]] = {}
    for o in outputs:
        # One host read per micro-batch for all of its statistics, not one per number.
        keys = [(name, kind) for name in o.sums for kind in ("sums", "counts", "mins", "maxs") if name in getattr(o, kind)]
        if not keys:
            continue
        values = dict(zip(keys, torch.stack([getattr(o, kind)[name].double() for name, kind in keys]).tolist()))
        for name in o.sums:
            e = local.setdefault(name, [0.0, 0.0, math.inf, -math.inf, 0.0])  # sum, count, min, max, extreme?
            e[0] += values[name, "sums"]
            e[1] += values[name, "counts"]
            if name in o.mins:
                e[2] = min(e[2], values[name, "mins"])
                e[3] = max(e[3], values[name, "maxs"])
                e[4] = 1.0
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        merged: dict[str, list[float]] = {}
        for part in gather_object([local]):
            for name, e in part.items():
                m = merged.setdefault(name, [0.0, 0.0, math.inf, -math.inf, 0.0])
                m[0] += e[0]; m[1] += e[1]; m[2] = min(m[2], e[2]); m[3] = max(m[3], e[3]); m[4] = max(m[4], e[4])
        local = merged
    out: dict[str, float] = {}
    for name, (s, c, lo, hi, extreme) in local.items():
        mean = s / c if c > 0 else math.nan
        if extreme:
            out[f"{name}_mean"], out[f"{name}_min"], out[f"{name}_max"] = mean, lo if c else math.nan, hi if c else math.nan
        else:
            out[name] = mean
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def steps_for_epochs(epochs: float, rows: int, rows_per_process_step: int, processes: int = 1) -> int:
    """Optimizer steps of `epochs` passes over `rows` training rows, each step taking
    `rows_per_process_step` (batch x accumulation) rows on each of `processes` processes."""
    if rows < 1:
        raise HPDError("epochs needs training rows to count passes over, and the data has none")
    return max(1, math.ceil(epochs * rows / (rows_per_process_step * processes)))


class Trainer:
    """Holds the run's state; `run()` trains to `max_steps`. Use `train(cfg)`."""

    def __init__(self, cfg: Config):
        from transformers.utils import logging as hf_logging

        self.cfg = cfg.validate()
        hf_logging.disable_progress_bar()  # ours is the one progress bar
        # log.report_to / log.tensorboard: a tracker whose package is missing fails here, before anything is written.
        self.trackers = resolve_trackers(cfg.log.report_to, cfg.log.tensorboard)
        self._trackers_started = False
        self.acc = make_accelerator(resolve_mixed_precision(cfg.optim.mixed_precision),
                                    log_with=make_trackers(self.trackers, Path(cfg.output_dir)) or None)
        self.fsdp = is_fsdp(self.acc)
        self.is_main = self.acc.is_main_process
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.run_dir = Path(cfg.output_dir)
        check_run_paths(cfg)  # before anything is written: no root or home, no input inside
        # One run per directory: the main process holds an OS lock on it until the run ends (or
        # dies); a second run into it stops here with the holder's pid and start time.
        self.lock = RunDirLock(self.run_dir) if self.is_main else None
        stale = self.lock.acquire() if self.lock is not None else None
        try:
            self._setup(cfg, stale)
        except BaseException:
            self.close(cleanup=True)  # a run that never started leaves the directory as it found it
            raise

    def close(self, cleanup: bool = False) -> None:
        """Release the run directory (cleanup: also remove the lock files this run created)."""
        responses = getattr(self, "responses", None)
        if responses is not None:  # a generation server the run started
            responses.close()
        if self._trackers_started:  # however the run ended: flush TensorBoard, end the MLflow/W&B run
            self._trackers_started = False
            finish_trackers(self.acc)
        if self.lock is not None:
            self.lock.release(cleanup=cleanup)

    def _setup(self, cfg: Config, stale: dict | None) -> None:
        if self.is_main:
            if stale is not None:
                self.log(f"taking over {self.run_dir}: the run that held it ({describe_holder(stale)}) ended "
                         "without releasing it (killed?)")
            removed = clean_leftovers(self.run_dir)
            if removed:
                self.log(f"removed what an interrupted checkpoint write or prune left: {', '.join(removed)}")
            self.resume_from = resolve_resume(cfg.resume, self.run_dir, warn=self.log)
        self.acc.wait_for_everyone()
        if not self.is_main:  # the main process has removed damaged checkpoints by now
            self.resume_from = resolve_resume(cfg.resume, self.run_dir, warn=lambda _msg: None)
        # Everything a user can get wrong is checked here, before anything but the lock is written.
        # A teacher cache replaces the teacher: it is checked against this run's data, tokenizer,
        # temperature and objective here, and the teacher model is never built.
        self.cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
        student, teacher, self.tokenizer, self.vocab_size, teacher_tok = load_models(cfg, self.cache,
                                                                                     with_teacher_tokenizer=True)
        self._check_rollout_bias(cfg, student)
        if cfg.data.packing:  # before any data is read: a model that cannot keep packed rows apart stops here
            check_packing(student, "student")
            if teacher is not None:
                check_packing(teacher, "teacher")
        if cfg.data.streaming:
            check_streaming(cfg)
        self.train_data, self.eval_data, self.data_info = load_data(
            cfg, self.tokenizer, teacher_tok if cfg.teacher.cross_tokenizer else None)
        if cfg.epochs is not None:  # before the resume check and the schedule, which both read max_steps
            cfg.max_steps = steps_for_epochs(cfg.epochs, len(self.train_data), cfg.optim.batch_size * cfg.optim.grad_accum,
                                             self.world)
            self.log(f"epochs={cfg.epochs:g} over {len(self.train_data)} training rows: max_steps={cfg.max_steps}")
        # A resume continues the run its checkpoint belongs to: a config that changes that run is
        # refused unless resume_allow_changes=true (hpd.resume).
        self._resume_state: dict[str, Any] | None = None
        self._resume_changes: dict[str, tuple[Any, Any]] = {}
        self._schedule_note: str | None = None
        if self.resume_from is not None:
            state = load_trainer_state(self.resume_from)
            saved = saved_config(self.resume_from)
            changes = config_changes(saved, cfg)
            check_changes(changes, cfg, self.resume_from, state["step"])
            self._resume_state, self._resume_changes = state, changes
            self._schedule_note = schedule_note(saved, cfg, state["scheduler"].get("last_epoch", state["step"]))

        self.objective = objective_from_config(cfg)
        self.self_distill = cfg.regime.name == "self"
        self.train_rows = self.eval_rows = None
        self.servers: TeacherServers | None = None
        if self.cache is not None:
            self.cache.check_run(temperature=self.objective.temperature, support=self.objective.support,
                                 objective=self.objective.name)
            self.train_rows = self.cache.rows_of(self.train_data, "training", cfg.data)
            self.eval_rows = self.cache.rows_of(self.eval_data, "evaluation", cfg.data) if self.eval_data else []
            self.data_info["teacher_cache"] = str(self.cache.path)
        elif cfg.teacher.server is not None:
            self.servers = TeacherServers(cfg.teacher.server, timeout=cfg.teacher.server_timeout,
                                          retries=cfg.teacher.server_retries, log=self.log)
            self.vocab_size = self._check_servers(cfg, student)
        elif teacher is None and self.objective.needs_teacher and not self.self_distill:
            raise HPDError(f"objective '{cfg.objective.name}' needs a teacher: set teacher.path")
        self.pad_id = self.tokenizer.pad_token_id

        device = self.acc.device
        check_supported(cfg, self.acc.distributed_type)
        r = cfg.regime
        self.teacher = place_teacher(teacher, self.acc, log=self.log, sampled_by_main=r.name == "teacher" or (
            r.name == "mixed" and r.off_policy == "teacher"))
        self.student = student
        r = cfg.regime
        # Rollout reuse: one rollout batch feeds minibatches x epochs optimizer steps (None: a fresh
        # rollout every step, the plain on-policy path).
        self.reuse = (r.minibatches, r.epochs) if r.minibatches * r.epochs > 1 else None
        self.rollouts: dict[str, Any] | None = None  # the rollout batch in use: its step and micro-batches
        self.module = DistillationLoss(student, self.objective, chunk_size=cfg.objective.chunk_size, vocab_size=self.vocab_size,
                                       clip=RatioClip(r.clip_low, r.clip_high, r.dual_clip) if self.reuse else None)
        optimizer, self.scheduler = make_optimizer(cfg, student)
        self.module, self.optimizer = self.acc.prepare(self.module, optimizer)
        # The one place that knows the kinds of teacher: the step below only asks the source.
        self.teacher_source: TeacherSource | None = None
        if self.cache is not None:
            self.teacher_source = CachedTeacher(self.cache, {"train": self.train_rows, "eval": self.eval_rows}, device)
        elif self.self_distill:
            self.teacher_source = OPSDTeacher(SelfTeacher(self.unwrapped, cfg.opsd.teacher_weights, cfg.opsd.ema_decay),
                                              self.pad_id, device)
            self._check_prompt_endings()
        elif self.servers is not None:
            self.teacher_source = ServedTeacher(self.servers, cfg.teacher.server_top_k, self.vocab_size, device,
                                                temperature=self.objective.temperature,
                                                exact_samples=cfg.teacher.server_exact_samples)
        elif self.teacher is not None and cfg.teacher.cross_tokenizer:
            self.teacher_source = CrossTokenizerTeacher(self.teacher, teacher_tok, self.tokenizer, device,
                                                        whole_spans=self.objective.support != "vocab",
                                                        chunk_size=cfg.objective.chunk_size or DEFAULT_CHUNK_SIZE)
        elif self.teacher is not None:
            self.teacher_source = ModelTeacher(self.teacher)
        if cfg.data.streaming:  # the sampler holds each batch's examples: it is the training data
            self.sampler = self.train_data = StreamSampler(cfg.data.train, self.tokenizer, cfg.data,
                                                           batch_size=cfg.optim.batch_size, seed=cfg.seed,
                                                           num_replicas=self.world, rank=self.rank)
            self.sampler.check()
        else:
            self.sampler = EpochSampler(len(self.train_data), cfg.optim.batch_size, seed=cfg.seed,
                                        num_replicas=self.world, rank=self.rank)
        self.step = 0
        self.bad_in_row = 0
        # Cumulative costs, kept across resumes: training wall time, tokens through the teacher's
        # forward (for the objective, not for logging diagnostics), tokens sampled from the student,
        # and cpu_s (this process's CPU time: the cost figure that stays comparable when other jobs
        # share the cores).
        self.totals = {"elapsed_s": 0.0, "cpu_s": 0.0, "teacher_tokens_total": 0.0, "generated_tokens_total": 0.0}
        # Where each step's responses come from (the regime); the step only asks it.
        generations = (Path(cfg.regime.teacher_cache) if cfg.regime.teacher_cache
                       else self.run_dir.parent / "teacher_generations")
        self.responses: ResponseSource = response_source(cfg, student=self.unwrapped, teacher=self.teacher,
                                                         tokenizer=self.tokenizer, train_data=self.train_data,
                                                         rank=self.rank, cache_dir=generations,
                                                         backend=self._generation_backend(cfg) if has_rollouts(cfg) else None)
        self._gen: torch.Generator | None = None
        self._ahead: dict[tuple[int, tuple[int, ...]], MicroBatch] = {}  # the next step's batches, prepared early
        self._save_due = False  # a checkpoint postponed out of a run of non-finite steps

    # ---- helpers ----

    @staticmethod
    def _generation_backend(cfg: Config):
        r = cfg.regime
        # A rollout is at most max_new_tokens after a prompt of at most data.max_length tokens.
        return select_backend(r.backend, url=r.vllm_url, python=r.vllm_python, args=r.vllm_args,
                              max_model_len=cfg.data.max_length + r.max_new_tokens,
                              gpu_memory_utilization=r.vllm_gpu_memory)

    @property
    def has_teacher(self) -> bool:
        return self.teacher_source is not None

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[hpd] {msg}", flush=True)

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.module).student

    def _check_servers(self, cfg: Config, student: nn.Module) -> int:
        """The vocabulary the served teacher and the student share; `HPDError` when the servers serve
        another tokenizer or vocabulary than the student's (both named). Recorded in the run's info."""
        rows = vocab_rows(student)
        info = self.servers.check(self.tokenizer, None, cfg.teacher.server_top_k, student=f"the student ({cfg.student.path})",
                                  guess=rows)
        served = info["vocab_size"]
        shared = resolve_shared_vocab(rows, served, len(self.tokenizer)) if rows != served else rows
        if shared != served:
            raise HPDError(f"teacher server {self.servers.urls[0]} serves {info['models'][0]} with {served} vocabulary "
                           f"rows, the student ({cfg.student.path}) has {rows} and its tokenizer {len(self.tokenizer)} "
                           f"tokens: they share {shared}, but a served teacher is normalized over all {served}")
        self.data_info["teacher_server"] = info
        self.log(f"teacher served by {', '.join(f'{u} ({m})' for u, m in zip(info['servers'], info['models']))}: "
                 f"vocabulary {served}, top-{info['top_k']} per position")
        return served

    def _check_prompt_endings(self) -> None:
        """Warn when the teacher template makes the first response token follow another context."""
        rows = self.train_data
        bad = prompt_ending_mismatches([e.prompt_ids for e in rows], [e.teacher_prompt_ids for e in rows])
        self.data_info["teacher_prompt_ending_mismatches"] = len(bad)
        if bad:
            e = rows[bad[0]]
            self.log(f"warning: in {len(bad)} of {len(rows)} rows the teacher's prompt ends with another token than "
                     f"the student's, so their first response token follows different contexts (e.g. {e.source}: "
                     f"student ...{self.tokenizer.decode(e.prompt_ids[-12:])!r}, teacher "
                     f"...{self.tokenizer.decode(e.teacher_prompt_ids[-12:])!r}); end opsd.teacher_template with {{prompt}}")

    def _examples_batch(self, examples: list[EncodedExample], indices: list[int], split: str,
                        completions: list[list[int]] | None = None) -> MicroBatch:
        """Examples `indices` of the `split` data (with their reference completions, unless others
        are given) as a batch, with what the teacher source reads."""
        completions = completions if completions is not None else [e.completion_ids for e in examples]
        batch = make_batch([e.prompt_ids for e in examples], completions, pad_id=self.pad_id, vocab_size=self.vocab_size,
                           device=self.acc.device, pack=self.cfg.data.packing,
                           pack_length=self.cfg.data.pack_length)
        if self.teacher_source is not None:
            self.teacher_source.prepare(batch, examples, split, indices)
        return batch

    def _micro_batches(self) -> tuple[list[MicroBatch], int]:
        """This step's micro-batches on this process, and the tokens sampled for them."""
        batches, generated = [], 0
        ahead, self._ahead = self._ahead, {}
        for micro in range(self.cfg.optim.grad_accum):
            idx = next(self.sampler)
            examples = [self.train_data[i] for i in idx]
            completions, sampled = self.responses.completions(examples, idx, step=self.step, micro=micro)
            generated += sampled
            early = ahead.get((micro, tuple(idx))) if completions is None else None
            batches.append(early if early is not None else self._examples_batch(examples, idx, "train", completions))
        self._prefetch_next_step()
        return batches, generated

    def _prefetch_next_step(self) -> None:
        """Prepare the next step's micro-batches now, so that a teacher source that asks a server
        (`prefetches`) has their answers on the way while this step trains. Only where the next
        responses are known now (the data's own completions); the sampler is peeked at, not moved,
        so checkpoints and resumes are untouched."""
        if not (getattr(self.teacher_source, "prefetches", False) and self.cfg.regime.name == "dataset"
                and self.reuse is None and self.step + 1 < self.cfg.max_steps):
            return
        peek = copy.deepcopy(self.sampler)
        for micro in range(self.cfg.optim.grad_accum):
            idx = next(peek)
            self._ahead[(micro, tuple(idx))] = self._examples_batch([self.train_data[i] for i in idx], idx, "train")

    def _check_rollout_bias(self, cfg: Config, student: nn.Module) -> None:
        """Refuse (or with regime.allow_biased_rollouts, warn about) rollouts that are not samples of
        the loss distribution, for the objectives whose weights assume they are (orkl, hpd); warn
        for the others, whose weights are exact at every prefix the rollouts reach."""
        causes = rollout_bias(cfg, student)
        if not causes:
            return
        cls = objective_class(cfg.objective.name)
        sampled = cls.support != "vocab" and cls.needs_teacher
        if sampled and not cfg.regime.allow_biased_rollouts:
            raise HPDError(f"objective '{cfg.objective.name}' assumes its rollouts are samples of the student's loss "
                           f"distribution, but {'; '.join(causes)} (or set regime.allow_biased_rollouts=true to train "
                           "on them anyway)")
        self.log(f"warning: the rollouts are not samples of the loss distribution: {'; '.join(causes)}")

    def _reused_micro_batches(self, diagnostics: bool) -> tuple[list[MicroBatch], list[RolloutWeights], int, int, dict]:
        """This step's share of the current rollout batch (rolled out first when a new one is due):
        its micro-batches, their weights fixed at rollout time, the tokens sampled and through the
        teacher at this step, and what to log about the rollout (at its first step only)."""
        M, E = self.reuse
        ga, j = self.cfg.optim.grad_accum, self.step % (M * E)
        generated = teacher_tokens = 0
        info: dict[str, Any] = {"reuse_epoch": j // M, "reuse_minibatch": j % M}
        if j == 0:
            batches, outputs = [], []
            for micro in range(M * ga):  # the whole rollout batch, from the policy of this step
                idx = next(self.sampler)
                examples = [self.train_data[i] for i in idx]
                completions, sampled = self.responses.completions(examples, idx, step=self.step, micro=micro)
                generated += sampled
                batches.append((idx, self._examples_batch(examples, idx, "train", completions)))
            total = sum(b.num_active for _, b in batches)
            num_tokens = torch.tensor(float(total), device=self.acc.device)
            if self.world > 1:
                num_tokens = self.acc.reduce(num_tokens, "sum")
            fixed = []
            for micro, (_, b) in enumerate(batches):
                with self.acc.autocast():
                    teach = self._teacher_view(b) if self.has_teacher else None
                    res = self.module(b.input_ids, b.attention_mask, b.labels, teach, num_tokens=num_tokens,
                                      generator=self._generator(micro), diagnostics=diagnostics, fix_weights=True,
                                      position_ids=b.position_ids)
                fixed.append(res["rollout"])
                outputs.append(res["output"])
            teacher_tokens = sum(b.teacher_tokens for _, b in batches) if self.objective.needs_teacher else 0
            self.rollouts = {"step": self.step, "indices": [idx for idx, _ in batches],
                             "batches": [b for _, b in batches], "weights": fixed}
            value = sum(float(o.value) for o in outputs)
            if self.world > 1:
                value = float(self.acc.reduce(torch.tensor(value, device=self.acc.device), "sum"))
            info.update({"rollout_value": value,
                         **{f"rollout_{k}": v for k, v in global_metrics(outputs, self.acc).items()}})
        part = slice((j % M) * ga, (j % M + 1) * ga)
        return self.rollouts["batches"][part], self.rollouts["weights"][part], generated, teacher_tokens, info

    def _rollouts_state(self) -> dict[str, Any] | None:
        """The rollout batch in use when the run stops mid-way through it (else None): the prompts'
        indices, the completions and the fixed weights of its micro-batches."""
        if self.reuse is None or self.rollouts is None or self.step % (self.reuse[0] * self.reuse[1]) == 0:
            return None
        r = self.rollouts
        return {"step": r["step"], "reuse": list(self.reuse), "indices": r["indices"], "completions": [b.completions for b in r["batches"]],
                "weights": [w.state_dict() for w in r["weights"]]}

    def _load_rollouts(self, state: dict[str, Any]) -> None:
        examples = [[self.train_data[i] for i in idx] for idx in state["indices"]]
        self.rollouts = {
            "step": state["step"], "indices": state["indices"],
            "batches": [self._examples_batch(ex, idx, "train", comp)
                        for ex, idx, comp in zip(examples, state["indices"], state["completions"])],
            "weights": [RolloutWeights(**w).to(self.acc.device) for w in state["weights"]],
        }

    def _teacher_view(self, b: MicroBatch) -> TeacherView:
        """What the objective reads of the teacher for batch `b` (the run's `TeacherSource`)."""
        return self.teacher_source.view(b)

    def _generator(self, micro: int, salt: str = "sample") -> torch.Generator:
        """The generator of one micro-batch's draws: one object, re-seeded (a draw depends only on its seed)."""
        if self._gen is None:
            dev = self.acc.device
            self._gen = torch.Generator(device=dev) if dev.type != "mps" else torch.Generator()
        return self._gen.manual_seed(derive_seed(self.cfg.seed, self.step, micro, self.rank, salt))

    # ---- checkpoints ----

    def _student_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's full weights on the main process (gathered from every process under FSDP:
        all of them call this), None elsewhere."""
        sd = self.acc.get_state_dict(self.module)
        return {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")} if sd is not None else None

    def save(self) -> Path:
        cfg = self.cfg
        # Under FSDP each process writes its own slice of the student and of the optimizer state
        # (nothing is gathered); otherwise the main process writes the whole student and optimizer.
        student_sd = None if self.fsdp else self._student_state_dict()

        def write_main(tmp: Path) -> None:
            if not self.fsdp:
                self.unwrapped.save_pretrained(str(tmp / "model"), state_dict=student_sd)
                self.tokenizer.save_pretrained(str(tmp / "model"))
            save_state({"step": self.step, "sharded": self.fsdp,
                        "optimizer": None if self.fsdp else self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "sampler": self.sampler.state_dict(), "bad_in_row": self.bad_in_row, "world": self.world,
                        "totals": self.totals,
                        # The teacher source's state (the EMA of an OPSD teacher), under its historic key.
                        "self_teacher": self.teacher_source.state_dict() if self.teacher_source is not None else None},
                       tmp, STATE)
            save_config(cfg, tmp / "config.yaml")

        rollouts = self._rollouts_state()

        def write_rank(tmp: Path) -> None:  # what each process writes of its own
            if self.fsdp:
                (tmp / shard_name(self.rank)).parent.mkdir(exist_ok=True)
                save_state(local_state(self.unwrapped, self.optimizer), tmp, shard_name(self.rank))
            if rollouts is not None:
                save_state(rollouts, tmp, f"rollouts-rank{self.rank}")

        return save_checkpoint(self.run_dir, self.step, rank=self.rank, is_main=self.is_main,
                               barrier=self.acc.wait_for_everyone, write_main=write_main, keep_last=cfg.save.keep_last,
                               write_rank=write_rank)

    def _save_unless_diverging(self, final: bool = False) -> None:
        """Checkpoint now, unless the run is inside a run of non-finite steps: then the checkpoint
        waits for the next finite step, so that every checkpoint is one from before a bad streak."""
        if self.bad_in_row:
            if final:
                self.log(f"warning: the run ends inside a run of non-finite steps ({self.bad_in_row} in a row): no final "
                         "checkpoint; final/ holds the weights of the last finite step")
            elif not self._save_due:
                self.log(f"step {self.step}: no checkpoint inside a run of non-finite steps ({self.bad_in_row} in a "
                         "row); it is written after the next finite step")
            self._save_due = True
            return
        self._save_due = False
        self.save()

    def restore(self, ckpt: Path) -> None:
        state = self._resume_state if self._resume_state is not None else load_trainer_state(ckpt)
        if state.get("world", 1) != self.world:
            raise HPDError(f"checkpoint {ckpt} was written by {state.get('world')} processes, this run has {self.world}: "
                           "resume with the same number of processes")
        if bool(state.get("sharded", False)) != self.fsdp:
            raise HPDError(f"checkpoint {ckpt} was written {'with' if state.get('sharded') else 'without'} FSDP and this "
                           f"run is {'' if self.fsdp else 'not '}under FSDP: resume with the accelerate config it was "
                           "saved with")
        if self.fsdp:
            shard = ckpt / f"{shard_name(self.rank)}.json"
            if not shard.is_file():
                raise HPDError(f"checkpoint {ckpt} has no shard for process {self.rank} ({shard}): resume with the "
                               "number of processes it was saved with")
            load_local_state(self.unwrapped, self.optimizer, load_state(ckpt, shard_name(self.rank)), ckpt)
        else:
            load_student_weights(self.unwrapped, ckpt)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if any(k == "max_steps" or k.startswith("optim.") for k in self._resume_changes):
            self._apply_optim_config()
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.bad_in_row = state["step"], state["bad_in_row"]
        self.totals.update(state.get("totals", {}))
        if self.teacher_source is not None:
            self.teacher_source.load_state_dict(state.get("self_teacher"))
        if self.reuse is not None and self.step % (self.reuse[0] * self.reuse[1]):
            # Mid-way through a rollout batch: its rollouts, as they were (the policy that sampled them is gone).
            if not (ckpt / f"rollouts-rank{self.rank}.json").is_file():
                raise HPDError(f"checkpoint {ckpt} stops inside a rollout batch (step {self.step}, regime.minibatches x "
                               f"regime.epochs = {self.reuse[0] * self.reuse[1]}) but holds no rollouts for process "
                               f"{self.rank}: resume with the reuse settings and process count it was saved with")
            saved = load_state(ckpt, f"rollouts-rank{self.rank}")
            if saved["reuse"] != list(self.reuse):
                raise HPDError(f"checkpoint {ckpt} stops inside a rollout batch of regime.minibatches x regime.epochs = "
                               f"{saved['reuse'][0]} x {saved['reuse'][1]}, this run has {self.reuse[0]} x "
                               f"{self.reuse[1]}: resume with the reuse settings it was saved with")
            self._load_rollouts(saved)
        load_rng_state(ckpt, self.rank)

    def _apply_optim_config(self) -> None:
        """After a resume with a changed config: the optimizer takes this config's lr, weight decay
        and betas (load_state_dict restored the checkpoint's), on the schedule over this max_steps."""
        o, groups = self.cfg.optim, self.optimizer.param_groups
        factor = lr_lambda(self.cfg)(self.scheduler.last_epoch)
        for group, decay in zip(groups, (o.weight_decay, 0.0)):  # the groups of make_optimizer
            group.update(initial_lr=o.lr, lr=o.lr * factor, weight_decay=decay, betas=(o.adam_beta1, o.adam_beta2))
        self.scheduler.base_lrs = [o.lr] * len(groups)
        self.scheduler._last_lr = [g["lr"] for g in groups]

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective and diagnostics on held-out examples (their reference completions)."""
        cfg = self.cfg
        if not self.eval_data:
            return {}
        self.module.eval()
        bs = cfg.optim.batch_size
        ids = list(range(len(self.eval_data)))[self.rank::self.world][: bs * cfg.log.eval_batches]
        if self.fsdp:  # every forward gathers weights from all processes: the same number of batches on each
            ids = ids[: len(self.eval_data) // self.world]
        shard = [self.eval_data[i] for i in ids]
        outputs, loss_sum = [], 0.0
        batches = [self._examples_batch(shard[i:i + bs], ids[i:i + bs], "eval") for i in range(0, len(shard), bs)]
        n_active = self.acc.reduce(torch.tensor(float(sum(b.num_active for b in batches)), device=self.acc.device), "sum")
        for i, b in enumerate(batches):
            with self.acc.autocast():
                teach = self._teacher_view(b) if self.has_teacher else None
                res = self.module(b.input_ids, b.attention_mask, b.labels, teach, num_tokens=n_active,
                                  generator=self._generator(i, "eval"), diagnostics=True, position_ids=b.position_ids)
            outputs.append(res["output"])
            loss_sum += float(res["output"].value)
        self.module.train()
        metrics = global_metrics(outputs, self.acc)
        value = float(self.acc.reduce(torch.tensor(loss_sum, device=self.acc.device), "sum"))
        return {"value": value, **metrics}

    # ---- the loop ----

    def run(self) -> Path:
        """Train to max_steps; the run directory is released at the end, whatever happens."""
        try:
            return self._run()
        except HPDError:
            raise
        except Exception as e:
            what = space_error(e)
            if what is None:
                raise
            raise HPDError(f"{what} while writing to {self.run_dir}: free space or raise the limit, then rerun with "
                           "resume=auto (it continues from the last complete checkpoint)") from None
        finally:
            self.close()

    def _run(self) -> Path:
        cfg, acc = self.cfg, self.acc
        if self.resume_from is not None:
            self.restore(self.resume_from)
            self.log(f"resumed from {self.resume_from} at step {self.step}")
            if self._schedule_note:
                self.log(f"note: {self._schedule_note}")
            altering = {k: v for k, v in self._resume_changes.items() if k not in RUN_NEUTRAL_KEYS}
            if altering:
                self.log("warning: resumed with a changed config (resume_allow_changes=true): " +
                         ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in altering.items()))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        acc.wait_for_everyone()
        self.data_info.update(self.responses.prepare(is_main=self.is_main, barrier=acc.wait_for_everyone, log=self.log))
        start_trackers(acc, self.trackers, self.run_dir, config_to_dict(cfg))
        self._trackers_started = bool(self.trackers)
        metrics_log = MetricsLog(self.run_dir, self.is_main, self.step if self.resume_from is not None else None,
                                 (lambda rec: acc.log(tracker_values(rec), step=int(rec["step"]))) if self.trackers else None)
        if self._resume_changes and self.is_main:
            metrics_log.write(record_history(self.run_dir, self.resume_from, self.step, self._resume_changes,
                                             self._schedule_note))
        if self.resume_from is None:
            metrics_log.write({"type": "info", "step": 0, "world_size": self.world, "fsdp": self.fsdp, **self.data_info,
                               "student_parameters": sum(p.numel() for p in self.unwrapped.parameters()),
                               "teacher_parameters": self.teacher_source.parameters if self.teacher_source else 0,
                               "trainable_parameters": sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad),
                               # What this (the main) process holds: 1/world of each sharded tensor under FSDP.
                               "student_parameters_local": local_numel(self.unwrapped)})
        # Which code trains from here, at every start: a resumed run may continue under other code.
        if self.is_main:  # only the main process writes metrics.jsonl; the others need not hash the source
            metrics_log.write({"type": "code", "step": self.step, **code_record()})
        self.log(f"training {cfg.objective.name} ({cfg.regime.name} regime) for {cfg.max_steps} steps; "
                 f"{'streamed' if cfg.data.streaming else len(self.train_data)} training examples; run dir {self.run_dir}")
        skipped = self.data_info.get("train_skipped", 0) + self.data_info.get("eval_skipped", 0)
        if skipped:
            reasons = self.data_info.get("skip_reasons") or ["?"]
            self.log(f"skipped {skipped} malformed data rows (data.on_bad_row=skip), e.g. {reasons[0]}")
        # A bar on a terminal, a line every 30 s in a log (hpd.progress); labelled by what trains.
        progress = Progress(cfg.max_steps, f"{cfg.objective.name} ({cfg.regime.name})", unit="step", initial=self.step,
                            enabled=self.is_main and cfg.log.progress)
        try:
            while self.step < cfg.max_steps:
                if cfg.log.eval_every and self.step % cfg.log.eval_every == 0:
                    metrics_log.write({"type": "eval", "step": self.step, **self.evaluate()})
                record = self.train_step()
                self.step += 1
                # A skipped step is always logged, whatever log.every says.
                if record is not None and (record["type"] == "skip" or self.step % cfg.log.every == 0
                                           or self.step == cfg.max_steps):
                    metrics_log.write(record)
                progress.update(1, **({"loss": record["loss"]} if record is not None and "loss" in record else {}))
                if cfg.save.every and self.step < cfg.max_steps and (self.step % cfg.save.every == 0 or self._save_due):
                    self._save_unless_diverging()
        finally:
            progress.close()
        final_eval = self.evaluate() if self.eval_data else None
        if final_eval is not None:
            metrics_log.write({"type": "eval", "step": self.step, **final_eval})
        self._save_unless_diverging(final=True)
        # Under FSDP the weights are gathered (every process takes part) into a plain HF directory.
        final_sd = self._student_state_dict() if self.fsdp else None
        if self.is_main:
            save_model(self.unwrapped, self.tokenizer, self.run_dir / "final", dtype=cfg.save.dtype,
                       card=model_card(cfg, steps=self.step, eval_metrics=final_eval), state_dict=final_sd)
        acc.wait_for_everyone()
        self.log(f"done: student at {self.run_dir / 'final'}, metrics in {self.run_dir / 'metrics.jsonl'}")
        return self.run_dir

    def train_step(self) -> dict[str, Any] | None:
        cfg, acc = self.cfg, self.acc
        t0, c0 = time.perf_counter(), time.process_time()
        regime = self.responses.regime(self.step)
        # Counted like the logged steps (1-based), so that diagnostics_every = log.every puts them on every line.
        diagnostics = (self.step + 1) % cfg.log.diagnostics_every == 0
        if self.reuse is None:
            batches, generated = self._micro_batches()
            fixed: list[RolloutWeights | None] = [None] * len(batches)
            reuse_info: dict[str, Any] = {}
        else:
            batches, fixed, generated, reused_teacher_tokens, reuse_info = self._reused_micro_batches(diagnostics)
        local_tokens = torch.tensor(float(sum(b.num_active for b in batches)), device=acc.device)
        num_tokens = acc.reduce(local_tokens, "sum") if self.world > 1 else local_tokens
        outputs: list[ObjectiveOutput] = []
        loss_sum = torch.zeros((), device=acc.device)
        value_sum = torch.zeros((), device=acc.device)
        # sft needs the teacher only for the logged diagnostics: skip its forward otherwise.
        use_teacher = self.has_teacher and (self.objective.needs_teacher or diagnostics)
        # Tokens through a teacher forward (none with a cache: it was paid for once, when built).
        teacher_tokens = sum(b.teacher_tokens for b in batches) if self.objective.needs_teacher else 0
        if self.reuse is not None:  # the teacher was read at rollout time, for the whole rollout batch
            use_teacher, teacher_tokens = False, reused_teacher_tokens
        for micro, b in enumerate(batches):
            last = micro == len(batches) - 1
            with (nullcontext() if last else acc.no_sync(self.module)), acc.autocast():
                teach = self._teacher_view(b) if use_teacher else None
                res = self.module(b.input_ids, b.attention_mask, b.labels, teach, num_tokens=num_tokens,
                                  generator=self._generator(micro), diagnostics=diagnostics, rollout=fixed[micro],
                                  position_ids=b.position_ids)
                # DDP averages gradients over processes; the loss is already a share of the global
                # token mean, so scale it back up to keep the gradient of the global mean.
                acc.backward(res["loss"] * self.world)
            outputs.append(res["output"])
            loss_sum += res["loss"].detach()
            value_sum += res["output"].value
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.unwrapped.parameters(), max_norm)
        costs = torch.tensor([float(teacher_tokens), float(generated)], device=acc.device)
        totals = torch.cat([torch.stack([loss_sum, value_sum]).float(), costs])
        if self.world > 1:
            totals = acc.reduce(totals, "sum")
        loss, value, gnorm = float(totals[0]), float(totals[1]), float(grad_norm)
        self.totals["teacher_tokens_total"] += float(totals[2])
        self.totals["generated_tokens_total"] += float(totals[3])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            self.log(f"step {self.step + 1}: non-finite {what} ({loss if what == 'loss' else gnorm}); step skipped "
                     f"({self.bad_in_row} in a row)")
            if self.bad_in_row >= cfg.optim.max_bad_steps:
                last = latest_checkpoint(self.run_dir)  # never one written inside this streak
                raise DivergedError(
                    f"stopped at step {self.step + 1}: {self.bad_in_row} steps in a row had a non-finite {what} "
                    f"(optim.max_bad_steps={cfg.optim.max_bad_steps}). Last good checkpoint: "
                    f"{last if last else ('none yet' if cfg.save.every else 'none (save.every=0)')}. "
                    "Try a lower optim.lr, optim.max_grad_norm, or "
                    "objective.temperature, and check the data")
            self.totals["elapsed_s"] += time.perf_counter() - t0
            self.totals["cpu_s"] += time.process_time() - c0
            return {"type": "skip", "step": self.step + 1, "reason": f"non-finite {what}", "regime": regime, **self.totals}
        self.bad_in_row = 0
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.responses.after_optimizer_step(self.unwrapped)
        if self.teacher_source is not None:
            self.teacher_source.after_step()
        dt = time.perf_counter() - t0
        self.totals["elapsed_s"] += dt
        self.totals["cpu_s"] += time.process_time() - c0
        record = {"type": "train", "step": self.step + 1, "loss": loss, "value": value, "lr": lr, "grad_norm": gnorm,
                  "regime": regime, "tokens": float(num_tokens), "tokens_per_s": float(num_tokens) / dt, "step_time_s": dt,
                  "peak_mem_mb": peak_memory_mb(acc.device),
                  "epoch": self.sampler.progress if self.cfg.data.streaming
                  else self.sampler.epoch + self.sampler.position / self.sampler.num_examples, **self.totals,
                  **self.responses.metrics(), **reuse_info}
        if (self.step + 1) % cfg.log.every == 0 or self.step + 1 == cfg.max_steps:
            record.update(global_metrics(outputs, acc))
            if self.teacher_source is not None:
                record.update(self.teacher_source.stats())
        return record


def train(config: Config | dict | str | os.PathLike) -> Path:
    """Train as the config says; returns the run directory (its `final/` holds the student).

    `config` is a `Config`, a dict of the YAML structure, or the path of a YAML file.
    """
    if isinstance(config, (str, os.PathLike)):
        config = load_config(str(config))
    elif isinstance(config, dict):
        from hpd.config import config_from_dict

        config = config_from_dict(config)
    return Trainer(config).run()


__all__ = ["DistillationLoss", "Trainer", "train"]
