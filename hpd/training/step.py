"""One micro-batch's distillation step as a module, and the step's metrics over processes.

`DistillationLoss` wraps the student's forward *and* the objective's loss, so that DDP/FSDP wrap
both: `hpd train`'s loop (`hpd.training.trainer`) calls it once per micro-batch, the Trainer
integrations (`hpd.integrations`) and the tests use it as the reference loss. `global_metrics`
merges the objectives' token-weighted statistics of a step over micro-batches and processes.

    >>> import torch
    >>> from hpd.models.loading import load_model
    >>> from hpd.objectives import get_objective
    >>> student, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32, "intermediate_size": 64}, seed=0)
    >>> step = DistillationLoss(student, get_objective("sft"), chunk_size=0, vocab_size=None)
    >>> ids = torch.tensor([[5, 6, 7, 8]]); labels = torch.tensor([[-100, 7, 8, -100]])
    >>> out = step(ids, torch.ones_like(ids), labels, None, num_tokens=torch.tensor(2), generator=None, diagnostics=False)
    >>> out["loss"].backward()
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hpd.models.head import final_hidden_states, lm_head_of, model_inputs
from hpd.objectives import DEFAULT_CHUNK_SIZE, Objective, ObjectiveOutput, RatioClip, RolloutWeights, rollout_weights


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
