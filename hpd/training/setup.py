"""What a run is built from, before its first step: `setup_run` loads and checks everything (the
resume point, the models, the data, the objective, the teacher and response sources, the optimizer
and the data order) and sets the attributes the loop in `hpd.training.trainer` reads; the pieces it
calls (`load_models`, `load_data`, `make_optimizer`, `objective_from_config`, ...) are usable alone.
Everything a user can get wrong stops here, before anything but the run directory's lock is written.

    >>> from hpd.config import load_config
    >>> steps_for_epochs(2, rows=10, rows_per_process_step=4)
    5
    >>> objective_from_config(load_config(None, ["objective.name=skl", "objective.alpha=0.2"])).name
    'skl'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hpd.data.batches import MicroBatch, make_batch
from hpd.training.checkpoint import clean_leftovers, load_trainer_state, resolve_resume
from hpd.config import Config
from hpd.data.encode import EncodedExample, encode_file, encode_self_distillation
from hpd.data.order import EpochSampler
from hpd.data.rows import load_examples
from hpd.training.distributed import check_supported, place_teacher
from hpd.errors import HPDError
from hpd.models.hub import resolve_model_path
from hpd.data.packing import check_packing
from hpd.data.streaming import StreamSampler, check_streaming
from hpd.models.loading import apply_lora, load_model, load_saved_tokenizer, vocab_rows
from hpd.models.head import enable_gradient_checkpointing, lm_head_of
from hpd.models.from_teacher import init_from_teacher
from hpd.objectives import COMMON_PARAMS, DEFAULT_CHUNK_SIZE, Objective, RatioClip, objective_class, param_fields
from hpd.responses.regimes import ResponseSource, derive_seed, has_rollouts, response_source, rollout_bias
from hpd.responses.backends import select_backend
from hpd.training.schedule import lr_lambda
from hpd.training.resume import check_changes, config_changes, saved_config, schedule_note
from hpd.training.run_dir import describe_holder
from hpd.teachers.served import TeacherServers
from hpd.teachers.cache import TeacherCache
from hpd.teachers.routing import DEFAULT, NamedTeachers, cache_rows
from hpd.teachers.cross_tokenizer import CachedCrossTokenizerTeacher, CrossTokenizerTeacher, ServedCrossTokenizerTeacher
from hpd.teachers.sources import (
    CachedTeacher, ModelTeacher, OPSDTeacher, SelfTeacher, ServedTeacher, TeacherSource, prompt_ending_mismatches,
)
from hpd.vocab import resolve_shared_vocab, teacher_vocab_size
from hpd.training.step import DistillationLoss

if TYPE_CHECKING:
    from hpd.training.trainer import Trainer


def resolve_mixed_precision(name: str) -> str:
    """optim.mixed_precision with `auto` resolved: bf16 on a CUDA GPU with bf16 support, else no."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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
    xtok = cfg.teacher.cross_tokenizer
    if cache is not None:
        # the teacher's tokenizer is saved with the cache: a tiny student takes it, a run across tokenizers aligns with it
        tokenizer = cache.tokenizer() if cfg.student.path == "tiny" or xtok else None
    elif cfg.teacher.server is not None and xtok:  # the served teacher's tokenizer, to tokenize its sequences here
        tokenizer = load_saved_tokenizer(_teacher_tokenizer_dir(cfg), trust_remote_code=cfg.teacher.trust_remote_code)
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
        at_hand = resolve_model_path(cfg.teacher.path, download=False) if cfg.teacher.path not in ("tiny", "none") else None
        cache.check_run(tokenizer=s_tok if s_tok is not tokenizer else None, teacher_path=at_hand,  # checked when at hand
                        cross_tokenizer=xtok,
                        teacher_tokenizer=load_saved_tokenizer(at_hand) if xtok and at_hand and Path(at_hand).is_dir()
                        and any(Path(at_hand).glob("tokenizer*")) else None)
    if cache is not None and not xtok:
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
        return student, teacher, s_tok, vocab_size, tokenizer if teacher is not None or xtok else None
    return student, teacher, s_tok, vocab_size


def _teacher_tokenizer_dir(cfg: Config) -> str:
    """teacher.path as the directory of the teacher's tokenizer (a served teacher across tokenizers)."""
    path = resolve_model_path(cfg.teacher.path, download=False) if cfg.teacher.path not in ("tiny", "none") else None
    if path is None or not Path(path).is_dir():
        raise HPDError(f"teacher.server with teacher.cross_tokenizer=true tokenizes the teacher's sequences here: "
                       f"teacher.path must be a directory holding the served teacher's tokenizer (its weights are not "
                       f"loaded), got {cfg.teacher.path!r}")
    return str(path)


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


def steps_for_epochs(epochs: float, rows: int, rows_per_process_step: int, processes: int = 1) -> int:
    """Optimizer steps of `epochs` passes over `rows` training rows, each step taking
    `rows_per_process_step` (batch x accumulation) rows on each of `processes` processes."""
    if rows < 1:
        raise HPDError("epochs needs training rows to count passes over, and the data has none")
    return max(1, math.ceil(epochs * rows / (rows_per_process_step * processes)))


def setup_run(t: Trainer, cfg: Config, stale: dict | None) -> None:
    """Build the run `t` trains: resume point, models, data, checks, objective, teacher and response
    sources, optimizer, sampler (`stale`: what the lock found of a run that died holding it). Every
    attribute the loop reads is set here."""
    if t.is_main:
        if stale is not None:
            t.log(f"taking over {t.run_dir}: the run that held it ({describe_holder(stale)}) ended "
                     "without releasing it (killed?)")
        removed = clean_leftovers(t.run_dir)
        if removed:
            t.log(f"removed what an interrupted checkpoint write or prune left: {', '.join(removed)}")
        t.resume_from = resolve_resume(cfg.resume, t.run_dir, warn=t.log)
    t.acc.wait_for_everyone()
    if not t.is_main:  # the main process has removed damaged checkpoints by now
        t.resume_from = resolve_resume(cfg.resume, t.run_dir, warn=lambda _msg: None)
    # Everything a user can get wrong is checked here, before anything but the lock is written.
    # A teacher cache replaces the teacher: it is checked against this run's data, tokenizer,
    # temperature and objective here, and the teacher model is never built.
    t.cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    student, teacher, t.tokenizer, t.vocab_size, teacher_tok = load_models(cfg, t.cache,
                                                                                 with_teacher_tokenizer=True)
    check_rollout_bias(cfg, student, t.log)
    if cfg.data.packing:  # before any data is read: a model that cannot keep packed rows apart stops here
        check_packing(student, "student")
        if teacher is not None:
            check_packing(teacher, "teacher")
    if cfg.data.streaming:
        check_streaming(cfg)
    t.train_data, t.eval_data, t.data_info = load_data(
        cfg, t.tokenizer, teacher_tok if cfg.teacher.cross_tokenizer else None)
    if cfg.epochs is not None:  # before the resume check and the schedule, which both read max_steps
        cfg.max_steps = steps_for_epochs(cfg.epochs, len(t.train_data), cfg.optim.batch_size * cfg.optim.grad_accum,
                                         t.world)
        t.log(f"epochs={cfg.epochs:g} over {len(t.train_data)} training rows: max_steps={cfg.max_steps}")
    # A resume continues the run its checkpoint belongs to: a config that changes that run is
    # refused unless resume_allow_changes=true (hpd.training.resume).
    t._resume_state: dict[str, Any] | None = None
    t._resume_changes: dict[str, tuple[Any, Any]] = {}
    t._schedule_note: str | None = None
    if t.resume_from is not None:
        state = load_trainer_state(t.resume_from)
        saved = saved_config(t.resume_from)
        changes = config_changes(saved, cfg)
        check_changes(changes, cfg, t.resume_from, state["step"])
        t._resume_state, t._resume_changes = state, changes
        t._schedule_note = schedule_note(saved, cfg, state["scheduler"].get("last_epoch", state["step"]))

    t.objective = objective_from_config(cfg)
    t.self_distill = cfg.regime.name == "self"
    t.train_rows = t.eval_rows = None
    t.servers: TeacherServers | None = None
    if t.cache is not None:
        t.cache.check_run(temperature=t.objective.temperature, support=t.objective.support,
                             objective=t.objective.name)
        # With a teacher per row the cache holds the rows of the default teacher only.
        mine = (lambda e: e.teacher in (None, DEFAULT)) if cfg.teacher.named else None
        t.train_rows = cache_rows(t.cache, t.train_data, "training", cfg.data, mine)
        t.eval_rows = cache_rows(t.cache, t.eval_data, "evaluation", cfg.data, mine)
        t.data_info["teacher_cache"] = str(t.cache.path)
    elif cfg.teacher.server is not None:
        t.servers = TeacherServers(cfg.teacher.server, timeout=cfg.teacher.server_timeout,
                                   retries=cfg.teacher.server_retries, log=t.log)
        if cfg.teacher.cross_tokenizer:  # checked against the teacher's tokenizer; the loss runs over the student's
            t.served_vocab = check_servers(t, cfg, student, teacher_tok)
        else:
            t.vocab_size = check_servers(t, cfg, student)
    elif teacher is None and t.objective.needs_teacher and not t.self_distill and not cfg.teacher.named:
        raise HPDError(f"objective '{cfg.objective.name}' needs a teacher: set teacher.path")
    t.pad_id = t.tokenizer.pad_token_id
    # A teacher per row (teacher.named): the named teachers loaded and checked against the student
    # here, with the default teacher (the teacher section's, if any) one vocabulary for the loss.
    t.named = NamedTeachers(cfg, student, t.tokenizer, t.objective, t.acc.device, t.log) if cfg.teacher.named else None
    if t.named is not None:
        default_exists = teacher is not None or t.cache is not None or t.servers is not None
        t.vocab_size = t.named.vocab_size(t.vocab_size if default_exists else None,
                                          default_exact=t.cache is not None or t.servers is not None)
        t.data_info["teachers"] = t.named.describe()

    device = t.acc.device
    check_supported(cfg, t.acc.distributed_type)
    r = cfg.regime
    if t.named is not None and teacher is not None:  # a replica, as the named ones (`NamedTeachers`)
        t.teacher = teacher.to(device)
    else:
        t.teacher = place_teacher(teacher, t.acc, log=t.log, sampled_by_main=r.name == "teacher" or (
            r.name == "mixed" and r.off_policy == "teacher"))
    t.student = student
    r = cfg.regime
    # Rollout reuse: one rollout batch feeds minibatches x epochs optimizer steps (None: a fresh
    # rollout every step, the plain on-policy path).
    t.reuse = (r.minibatches, r.epochs) if r.minibatches * r.epochs > 1 else None
    t.rollouts: dict[str, Any] | None = None  # the rollout batch in use: its step and micro-batches
    t.module = DistillationLoss(student, t.objective, chunk_size=cfg.objective.chunk_size, vocab_size=t.vocab_size,
                                   clip=RatioClip(r.clip_low, r.clip_high, r.dual_clip) if t.reuse else None)
    optimizer, t.scheduler = make_optimizer(cfg, student)
    t.module, t.optimizer = t.acc.prepare(t.module, optimizer)
    # The one place that knows the kinds of teacher: the step below only asks the source.
    t.teacher_source: TeacherSource | None = None
    xtok = dict(whole_spans=t.objective.support != "vocab")  # what a source across tokenizers masks
    if t.cache is not None and cfg.teacher.cross_tokenizer:
        t.teacher_source = CachedCrossTokenizerTeacher(t.cache, {"train": t.train_rows, "eval": t.eval_rows},
                                                       teacher_tok, t.tokenizer, device, **xtok)
    elif t.cache is not None:
        t.teacher_source = CachedTeacher(t.cache, {"train": t.train_rows, "eval": t.eval_rows}, device)
    elif t.self_distill:
        t.teacher_source = OPSDTeacher(SelfTeacher(t.unwrapped, cfg.opsd.teacher_weights, cfg.opsd.ema_decay),
                                          t.pad_id, device)
        check_prompt_endings(t)
    elif t.servers is not None and cfg.teacher.cross_tokenizer:
        t.teacher_source = ServedCrossTokenizerTeacher(
            t.servers, cfg.teacher.server_top_k, t.served_vocab, teacher_tok, t.tokenizer, device, **xtok,
            temperature=t.objective.temperature, exact_samples=cfg.teacher.server_exact_samples)
    elif t.servers is not None:
        t.teacher_source = ServedTeacher(t.servers, cfg.teacher.server_top_k, t.vocab_size, device,
                                            temperature=t.objective.temperature,
                                            exact_samples=cfg.teacher.server_exact_samples)
    elif t.teacher is not None and cfg.teacher.cross_tokenizer:
        t.teacher_source = CrossTokenizerTeacher(t.teacher, teacher_tok, t.tokenizer, device, **xtok,
                                                 chunk_size=cfg.objective.chunk_size or DEFAULT_CHUNK_SIZE)
    elif t.teacher is not None:
        t.teacher_source = ModelTeacher(t.teacher)
    if t.named is not None:  # one source over them all: the step still asks only it
        t.teacher_source = t.named.router(
            t.teacher_source, {"train": t.train_data, "eval": t.eval_data},
            lambda prompts, completions: make_batch(prompts, completions, pad_id=t.pad_id,
                                                    vocab_size=t.vocab_size, device=device),
            t.vocab_size, t.pad_id)
        t.data_info["teacher_rows"] = t.named.rows
    if cfg.data.streaming:  # the sampler holds each batch's examples: it is the training data
        t.sampler = t.train_data = StreamSampler(cfg.data.train, t.tokenizer, cfg.data,
                                                       batch_size=cfg.optim.batch_size, seed=cfg.seed,
                                                       num_replicas=t.world, rank=t.rank,
                                                       teacher_tokenizer=teacher_tok if cfg.teacher.cross_tokenizer else None)
        t.sampler.check()
    else:
        t.sampler = EpochSampler(len(t.train_data), cfg.optim.batch_size, seed=cfg.seed,
                                    num_replicas=t.world, rank=t.rank)
    t.step = 0
    t.bad_in_row = 0
    # Cumulative costs, kept across resumes: training wall time, tokens through the teacher's
    # forward (for the objective, not for logging diagnostics), tokens sampled from the student,
    # and cpu_s (this process's CPU time: the cost figure that stays comparable when other jobs
    # share the cores).
    t.totals = {"elapsed_s": 0.0, "cpu_s": 0.0, "teacher_tokens_total": 0.0, "generated_tokens_total": 0.0}
    if t.teacher_source is not None:  # the source's own counts (a routed teacher's tokens per teacher)
        t.totals.update(t.teacher_source.step_counts())
    # Where each step's responses come from (the regime); the step only asks it.
    generations = (Path(cfg.regime.teacher_cache) if cfg.regime.teacher_cache
                   else t.run_dir.parent / "teacher_generations")
    t.responses: ResponseSource = response_source(cfg, student=t.unwrapped, teacher=t.teacher,
                                                     tokenizer=t.tokenizer, train_data=t.train_data,
                                                     rank=t.rank, cache_dir=generations,
                                                     backend=generation_backend(cfg) if has_rollouts(cfg) else None)
    t._gen: torch.Generator | None = None
    t._ahead: dict[tuple[int, tuple[int, ...]], MicroBatch] = {}  # the next step's batches, prepared early
    t._save_due = False  # a checkpoint postponed out of a run of non-finite steps


def generation_backend(cfg: Config):
    """The backend the run's rollouts are generated with (`regime.backend`)."""
    r = cfg.regime
    # A rollout is at most max_new_tokens after a prompt of at most data.max_length tokens.
    return select_backend(r.backend, url=r.vllm_url, python=r.vllm_python, args=r.vllm_args,
                          max_model_len=cfg.data.max_length + r.max_new_tokens,
                          gpu_memory_utilization=r.vllm_gpu_memory)


def check_rollout_bias(cfg: Config, student: nn.Module, log: Callable[[str], None]) -> None:
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
    log(f"warning: the rollouts are not samples of the loss distribution: {'; '.join(causes)}")


def check_servers(t: Trainer, cfg: Config, student: nn.Module, teacher_tokenizer=None) -> int:
    """The vocabulary the served teacher and the student share; `HPDError` when the servers serve
    another tokenizer or vocabulary than the student's (both named). Recorded in the run's info.
    teacher_tokenizer: across tokenizers, the teacher's (teacher.path): the servers must read text
    as it does; their vocabulary is returned (the teacher's, not shared)."""
    if teacher_tokenizer is not None:
        info = t.servers.check(teacher_tokenizer, None, cfg.teacher.server_top_k,
                               student=f"the teacher tokenizer at teacher.path ({cfg.teacher.path})",
                               guess=len(teacher_tokenizer))
        t.data_info["teacher_server"] = info
        t.log(f"teacher served by {', '.join(f'{u} ({m})' for u, m in zip(info['servers'], info['models']))} "
              f"across tokenizers: vocabulary {info['vocab_size']}, top-{info['top_k']} per position")
        return info["vocab_size"]
    rows = vocab_rows(student)
    info = t.servers.check(t.tokenizer, None, cfg.teacher.server_top_k, student=f"the student ({cfg.student.path})",
                              guess=rows)
    served = info["vocab_size"]
    shared = resolve_shared_vocab(rows, served, len(t.tokenizer)) if rows != served else rows
    if shared != served:
        raise HPDError(f"teacher server {t.servers.urls[0]} serves {info['models'][0]} with {served} vocabulary "
                       f"rows, the student ({cfg.student.path}) has {rows} and its tokenizer {len(t.tokenizer)} "
                       f"tokens: they share {shared}, but a served teacher is normalized over all {served}")
    t.data_info["teacher_server"] = info
    t.log(f"teacher served by {', '.join(f'{u} ({m})' for u, m in zip(info['servers'], info['models']))}: "
             f"vocabulary {served}, top-{info['top_k']} per position")
    return served


def check_prompt_endings(t: Trainer) -> None:
    """Warn when the teacher template makes the first response token follow another context."""
    rows = t.train_data
    bad = prompt_ending_mismatches([e.prompt_ids for e in rows], [e.teacher_prompt_ids for e in rows])
    t.data_info["teacher_prompt_ending_mismatches"] = len(bad)
    if bad:
        e = rows[bad[0]]
        t.log(f"warning: in {len(bad)} of {len(rows)} rows the teacher's prompt ends with another token than "
                 f"the student's, so their first response token follows different contexts (e.g. {e.source}: "
                 f"student ...{t.tokenizer.decode(e.prompt_ids[-12:])!r}, teacher "
                 f"...{t.tokenizer.decode(e.teacher_prompt_ids[-12:])!r}); end opsd.teacher_template with {{prompt}}")
