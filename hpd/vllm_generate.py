"""EXPERIMENTAL: student rollouts sampled by vLLM, colocated with training on the same GPU.

`VLLMGenerate` is a `hpd.rollout.GenerationBackend`: the trainer calls `generate(model, tokenizer,
prompt_ids, settings, seed=)` for rollouts and `after_optimizer_step(model)` after every optimizer
step. On its first `generate` it writes the student to a temporary HF directory and starts a vLLM
engine on it in this process (`gpu_memory_utilization` of the GPU, eager mode); after every
optimizer step it loads the student's current weights into the engine, so rollouts always come
from the policy being trained. Each prompt is sampled with its own seed derived from the call's
seed and its index, so a call is a pure function of (weights, prompts, seed), as with HF
`generate`, though vLLM's samples are not HF's.

Used when `regime.backend` is `vllm`, or `auto` with vLLM importable and a CUDA GPU visible
(`hpd.rollout.select_backend`); HF `generate` stays the CPU path. Not yet run on a GPU by the
project: a LoRA student is refused, and the weight sync goes through vLLM's in-process engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), whose internals move between vLLM versions.

    >>> from hpd.rollout import select_backend
    >>> type(select_backend("hf")).__name__
    'HFGenerate'
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from hpd.errors import HPDError
from hpd.rollout import GenerationBackend, HFGenerate


def _per_prompt_seeds(seed: int, n: int) -> list[int]:
    from hpd.regimes import derive_seed

    return [derive_seed(seed, i, "vllm") % 2**31 for i in range(n)]


class VLLMGenerate(GenerationBackend):
    """vLLM engine holding a copy of the student's weights, synced after each optimizer step."""

    def __init__(self, gpu_memory_utilization: float = 0.3):
        self.gpu_memory_utilization = gpu_memory_utilization
        self.llm = None
        self.model_id: int | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def for_teacher(self) -> GenerationBackend:
        # One engine holds one model: the teacher's generations are made once and cached, with HF.
        return HFGenerate()

    def _start(self, model, tokenizer) -> None:
        from hpd.models import is_peft_model

        if is_peft_model(model):
            raise HPDError("regime.backend=vllm does not sync LoRA adapters yet: use regime.backend=hf with a LoRA student")
        # The engine in this process, so that its model can be reached for the weight sync.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self._dir = tempfile.TemporaryDirectory(prefix="hpd-vllm-")
        path = Path(self._dir.name)
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[next(model.parameters()).dtype]
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=dtype, seed=0, enforce_eager=True,
                       gpu_memory_utilization=self.gpu_memory_utilization)
        self.model_id = id(model)

    def generate(self, model, tokenizer, prompt_ids, settings, *, seed):
        from vllm import SamplingParams

        if self.llm is None:
            self._start(model, tokenizer)
        elif id(model) != self.model_id:
            raise HPDError("a vLLM backend serves the one model it was started with; build another for another model")
        from hpd.rollout import _eos_ids

        s = settings
        eos = _eos_ids(model, tokenizer)
        sampling = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1) \
            if s.temperature > 0 else dict(temperature=0.0)
        params = [SamplingParams(max_tokens=s.max_new_tokens, stop_token_ids=eos, seed=ps, **sampling)
                  for ps in _per_prompt_seeds(seed, len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        # Expected to end with the stop token, as `generate_completions` keeps eos (to check on a GPU).
        return [list(o.outputs[0].token_ids) for o in outs]

    def after_optimizer_step(self, model) -> None:
        if self.llm is None:
            return  # started on the first rollout, from the weights of that moment
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]

        def load(vllm_model):
            vllm_model.load_weights(weights)

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)
        else:  # older vLLM: the driver worker's model
            load(self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model)


__all__ = ["VLLMGenerate"]
