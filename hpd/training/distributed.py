"""Several processes: the accelerator of a run, FSDP2 on CPUs too, the teacher's placement, and
the sharded part of a checkpoint.

`make_accelerator` is the one place a run gets its `accelerate.Accelerator`. Under
`accelerate launch --config_file configs/accelerate/fsdp.yaml` accelerate shards the student with
FSDP2 (`fully_shard`) on GPUs; without GPUs accelerate falls back to plain data parallelism over
gloo and ignores the FSDP settings, so here the same FSDP2 path (accelerate's
`fsdp2_prepare_model`, the plugin read from the launcher's environment) is switched on for CPUs
too: the tests run on CPUs exactly the wrapping a GPU run does.

The wrapping unit is the student's decoder layer: `hpd.training.step.DistillationLoss` exposes the
student's `_no_split_modules`, so accelerate's transformer auto-wrap shards every layer on its own
and the rest (embeddings, final norm, LM head) in the root unit. Under DDP the attribute is unused.

The teacher (forward-only) is placed by `place_teacher`: under FSDP its decoder layers are sharded
too (each process holds 1/world of each layer; a layer is gathered for its forward, then freed;
the embeddings, final norm and LM head stay whole), unless the
main process alone samples from it (`regime.name` teacher or mixed with teacher off-policy data):
then it stays a full replica on every process. Under DDP it is always a replica.

A checkpoint of an FSDP run holds, per process r, `shards/rank{r}.json` + `.safetensors`: that
process's slice of every student parameter and of the optimizer state (plain tensors, no pickle),
written and read by that process alone; `final/` is gathered to a plain HF directory on rank 0.
Resume needs the number of processes the checkpoint was written with.

    >>> from hpd.training.distributed import fsdp_requested
    >>> fsdp_requested({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from hpd.errors import HPDError

SHARDS = "shards"


def fsdp_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with `distributed_type: FSDP`)."""
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(mixed_precision: str, log_with=None):
    """The run's Accelerator: on GPUs as accelerate makes it; on CPUs with FSDP2 when requested."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    if cpu and fsdp_requested() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise HPDError("FSDP on CPUs needs FSDP2: set fsdp_version: 2 in the accelerate config "
                       "(configs/accelerate/fsdp.yaml does)")
    # Without a GPU, cpu=True is what makes accelerate use torch.distributed (gloo) across the
    # processes that `accelerate launch` started; otherwise each would train alone.
    acc = Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=log_with)
    if cpu and fsdp_requested() and acc.num_processes > 1:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        # accelerate switches to FSDP only for accelerator devices (AcceleratorState: the FSDP
        # branch is under MULTI_GPU/...); fully_shard itself runs on CPU tensors over gloo.
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* variables
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def end_process_group() -> None:
    """End this process's part of a multi-process command (`accelerate launch ... hpd train`).

    accelerate starts the torch.distributed process group and leaves ending it to
    `Accelerator.end_training`; a process that exits with the group alive leaves gloo's threads to
    the interpreter's teardown, where one can abort the process ("terminate called without an
    active exception") after the run has finished. The CLI calls this once, at exit; a Python user
    who runs `hpd.train` under a launcher ends the group themselves, as with any accelerate script.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_fsdp(acc) -> bool:
    return "FSDP" in str(acc.distributed_type)


def check_supported(cfg, distributed_type: Any) -> None:
    """Refuse, with a one-line HPDError, what hpd does not do under `distributed_type` yet."""
    kind = str(distributed_type)
    if "DEEPSPEED" in kind:
        raise HPDError("DeepSpeed is not supported yet: its optimizer state is sharded and hpd's checkpoints would "
                       "hold rank 0's part only (a wrong resume); use FSDP2, ZeRO-3's equivalent "
                       "(configs/accelerate/fsdp.yaml), or DDP")
    if "FSDP" not in kind:
        return
    if cfg.student.lora_rank > 0:
        raise HPDError("student.lora_rank > 0 under FSDP is not supported yet (the adapters' checkpoint and merge "
                       "assume whole weights): use DDP for LoRA students")
    if cfg.regime.name in ("student", "mixed", "self"):
        # Student rollouts: each process would generate sequences of its own length with weights
        # gathered layer by layer, so the processes' collectives go out of step; the OPSD teacher
        # calls the student outside the wrapped forward, where its root unit is not gathered.
        # Untested, so refused rather than risked.
        raise HPDError(f"regime.name={cfg.regime.name} runs the student outside the training forward (rollouts or the "
                       "OPSD teacher), which hpd does not do under FSDP yet: use DDP "
                       "(configs/accelerate/ddp-gpu.yaml), or regime.name=dataset/teacher")


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------


def shard_teacher(teacher: nn.Module, acc) -> nn.Module:
    """Shard a forward-only teacher's decoder layers over the processes; the rest (embeddings,
    final norm, LM head: a small part of a large model) stays a replica on each.

    The layers only, because hpd reads the teacher through its decoder and its LM head's weight
    (`hpd.models.head.final_hidden_states`, `lm_head_of`), not through the model's forward: a root unit
    around the whole model would never be gathered. Every process must run the teacher's forward in
    step (one call per micro-batch on all of them), which the training step does; a teacher one
    process samples from alone must stay a replica.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = set(getattr(teacher, "_no_split_modules", None) or [])
    layers = [m for m in teacher.modules() if type(m).__name__ in names]
    if not layers:
        raise HPDError(f"the teacher ({type(teacher).__name__}) names no decoder layer class (_no_split_modules): "
                       "it cannot be sharded; use a Hugging Face causal LM, or a teacher cache (hpd cache-teacher)")
    teacher = teacher.to(acc.device)
    mp = MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, mp_policy=mp)
    return teacher


def place_teacher(teacher: nn.Module | None, acc, *, sampled_by_main: bool, log) -> nn.Module | None:
    """The teacher on this process: sharded under FSDP (see the module docstring), else a replica."""
    if teacher is None:
        return None
    if not is_fsdp(acc) or acc.num_processes == 1:
        return teacher.to(acc.device)
    if sampled_by_main:
        log("the teacher is a full replica on every process: the main process alone generates the teacher's "
            "completions (regime teacher/mixed), which a sharded teacher cannot do")
        return teacher.to(acc.device)
    log(f"the teacher is sharded over {acc.num_processes} processes (FSDP2, one unit per decoder layer)")
    return shard_teacher(teacher, acc)


# --------------------------------------------------------------------------------------------
# Sharded checkpoint state: each process's slice of the student and of the optimizer state
# --------------------------------------------------------------------------------------------


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_numel(module: nn.Module) -> int:
    """Parameters this process holds (its slices of sharded ones)."""
    return sum(_local(p).numel() for p in module.parameters())


def local_state(module: nn.Module, optimizer) -> dict[str, Any]:
    """This process's slices: {"model": {name: (local rows)}, "optimizer": state_dict with local tensors}."""
    model = {name: _local(p.detach()) for name, p in module.named_parameters()}
    sd = optimizer.state_dict()
    state = {k: {n: _local(v) for n, v in s.items()} for k, s in sd["state"].items()}
    return {"model": model, "optimizer": {"state": state, "param_groups": sd["param_groups"]}}


def _param_list(optimizer) -> list[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def load_local_state(module: nn.Module, optimizer, state: dict[str, Any], source: Path) -> None:
    """Copy the slices `local_state` wrote back into the (identically sharded) module and optimizer."""
    from torch.distributed.tensor import DTensor

    saved = state["model"]
    params = dict(module.named_parameters())
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise HPDError(f"{source} does not match the student (missing {missing[:3]}, unexpected {extra[:3]}): resume "
                       "with the student config and the accelerate config it was saved with")
    with torch.no_grad():
        for name, p in params.items():
            local = _local(p)
            if tuple(saved[name].shape) != tuple(local.shape):
                raise HPDError(f"{source}: {name} has local shape {tuple(saved[name].shape)}, this process holds "
                               f"{tuple(local.shape)}: resume with the number of processes and the accelerate config "
                               "the checkpoint was written with")
            local.copy_(saved[name])
    osd = state["optimizer"]
    plist = _param_list(optimizer)
    rebuilt = {}
    for k, s in osd["state"].items():
        p = plist[int(k)]
        rebuilt[int(k)] = {n: (DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())
                               if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                           for n, v in s.items()}
    optimizer.load_state_dict({"state": rebuilt, "param_groups": osd["param_groups"]})


def shard_name(rank: int) -> str:
    return f"{SHARDS}/rank{rank}"


__all__ = ["check_supported", "end_process_group", "fsdp_requested", "is_fsdp", "load_local_state", "local_numel", "local_state", "make_accelerator", "place_teacher",
           "shard_name", "shard_teacher"]
