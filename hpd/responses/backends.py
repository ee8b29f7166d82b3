"""Which generation backend a run samples with: `select_backend` turns `regime.backend` (and the
vLLM settings) into a `hpd.responses.rollout.GenerationBackend`. Above both backends (`hpd.responses.rollout.HFGenerate`,
`hpd.responses.vllm_generate.VLLMGenerate`), so neither imports the other's chooser.

    >>> from hpd.responses.backends import select_backend
    >>> type(select_backend("hf")).__name__
    'HFGenerate'
"""

from __future__ import annotations

from pathlib import Path

import torch

from hpd.engine import engine_python
from hpd.errors import HPDError
from hpd.responses.rollout import GenerationBackend, HFGenerate
from hpd.responses.vllm_generate import VLLMGenerate

BACKENDS = ("auto", "hf", "vllm")


def select_backend(name: str = "auto", *, url: str | None = None, python: str | None = None, args: str = "",
                   max_model_len: int | None = None, gpu_memory_utilization: float = 0.3) -> GenerationBackend:
    """The generation backend `name` names: `hf` (Hugging Face `generate`, every device), `vllm` (a vLLM
    server, `hpd.responses.vllm_generate.VLLMGenerate`, given by `url` or started from the engine environment's
    `python`), or `auto` (vllm when a server is given, or a CUDA GPU is visible and the engine
    environment is there; else hf). The other arguments are `VLLMGenerate`'s."""
    if name not in BACKENDS:
        raise HPDError(f"unknown generation backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        engine = Path(python).expanduser().is_file() if python else engine_python(required=False) is not None
        name = "vllm" if url or (torch.cuda.is_available() and engine) else "hf"
    if name == "hf":
        return HFGenerate()
    return VLLMGenerate(url=url, python=python, args=args, max_model_len=max_model_len,
                        gpu_memory_utilization=gpu_memory_utilization)
