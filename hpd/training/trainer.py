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

The step never asks which regime or which kind of teacher it runs: `hpd.training.setup` builds the two
sources from the config once.

Everything random is a pure function of (seed, step, micro-batch, rank) or of a state saved in the
checkpoint, so a killed run resumed from its last checkpoint ends with the weights an
uninterrupted run would have.

    >>> from hpd.config import load_config
    >>> from hpd.training.trainer import train
    >>> cfg = load_config("configs/tiny.yaml", ["output_dir=/tmp/hpd-doc", "max_steps=2", "log.progress=false"])
    >>> run_dir = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpd.data.batches import MicroBatch, make_batch
from hpd.training.checkpoint import (
    STATE, latest_checkpoint, load_rng_state, load_student_weights, load_trainer_state, load_state, save_checkpoint, save_state, space_error,
)
from hpd.config import Config, config_to_dict, load_config, save_config
from hpd.data.encode import EncodedExample
from hpd.training.distributed import is_fsdp, load_local_state, local_numel, local_state, make_accelerator, shard_name
from hpd.errors import DivergedError, HPDError
from hpd.models.model_card import model_card
from hpd.training.progress import Progress
from hpd.provenance import code_record
from hpd.models.loading import save_model
from hpd.objectives import ObjectiveOutput, RolloutWeights, TeacherView
from hpd.responses.regimes import derive_seed
from hpd.training.schedule import lr_lambda
from hpd.training.resume import RUN_NEUTRAL_KEYS, record_history
from hpd.training.metrics_file import MetricsLog
from hpd.training.run_dir import RunDirLock, check_run_paths
from hpd.training.trackers import finish_trackers, make_trackers, resolve_trackers, start_trackers, tracker_values
from hpd.training.setup import resolve_mixed_precision, setup_run
from hpd.training.step import global_metrics


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far in MiB: GPU memory allocated on CUDA, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


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
            setup_run(self, cfg, stale)  # models, data, checks, resume, the sources: hpd.training.setup
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

    # ---- helpers ----

    @property
    def has_teacher(self) -> bool:
        return self.teacher_source is not None

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[hpd] {msg}", flush=True)

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.module).student

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
        # A bar on a terminal, a line every 30 s in a log (hpd.training.progress); labelled by what trains.
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
        source_counts = self.teacher_source.step_counts() if self.teacher_source is not None else {}
        costs = torch.tensor([float(teacher_tokens), float(generated), *source_counts.values()], device=acc.device)
        totals = torch.cat([torch.stack([loss_sum, value_sum]).float(), costs])
        if self.world > 1:
            totals = acc.reduce(totals, "sum")
        loss, value, gnorm = float(totals[0]), float(totals[1]), float(grad_norm)
        self.totals["teacher_tokens_total"] += float(totals[2])
        self.totals["generated_tokens_total"] += float(totals[3])
        for i, key in enumerate(source_counts):
            self.totals[key] += float(totals[4 + i])
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


__all__ = ["Trainer", "train"]
