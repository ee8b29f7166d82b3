"""Choosing the generation backend (`regime.backend`), and the experimental vLLM backend's contract
checked against a fake vLLM module (no GPU, no vLLM here)."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from hpd.config import load_config
from hpd.errors import HPDError
from hpd.regimes import SamplingSettings
from hpd.rollout import HFGenerate, select_backend
from hpd.trainer import Trainer


def _pretend(monkeypatch, *, vllm: bool, gpu: bool) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if vllm else None) if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)


@pytest.mark.parametrize("vllm", [False, True])
def test_auto_selects_hf_generate_on_cpu(monkeypatch, vllm):
    _pretend(monkeypatch, vllm=vllm, gpu=False)
    assert type(select_backend("auto")) is HFGenerate
    assert type(select_backend("hf")) is HFGenerate


def test_auto_selects_vllm_with_vllm_and_a_gpu(monkeypatch):
    from hpd.vllm_generate import VLLMGenerate

    _pretend(monkeypatch, vllm=True, gpu=True)
    backend = select_backend("auto", gpu_memory_utilization=0.5)
    assert isinstance(backend, VLLMGenerate) and backend.llm is None  # the engine starts on the first rollout
    assert type(backend.for_teacher()) is HFGenerate


@pytest.mark.parametrize("vllm, gpu, match", [
    (False, True, "needs vLLM, which is not installed: pip install vllm"),
    (False, False, "needs vLLM, which is not installed"),
    (True, False, "needs a CUDA GPU and none is visible: set regime.backend=hf"),
])
def test_asking_for_vllm_without_it_or_a_gpu_is_a_clear_error(monkeypatch, vllm, gpu, match):
    _pretend(monkeypatch, vllm=vllm, gpu=gpu)
    with pytest.raises(HPDError, match=match):
        select_backend("vllm")


def test_a_run_asking_for_vllm_on_cpu_stops_before_training(monkeypatch, repo_root, tmp_path):
    monkeypatch.chdir(repo_root)
    _pretend(monkeypatch, vllm=False, gpu=False)
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "regime.name=student", "regime.backend=vllm",
                                            "log.progress=false", "log.tensorboard=off"])
    with pytest.raises(HPDError, match="regime.backend=vllm needs vLLM"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _FakeLLM:
    """Records what the backend asks of vLLM; `generate` answers each prompt with its seed's digits."""

    instances: list["_FakeLLM"] = []

    def __init__(self, **kw):
        self.kw, self.loaded, self.calls = kw, [], []
        _FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        out = types.SimpleNamespace
        return [out(outputs=[out(token_ids=[p.seed % 7, p.stop_token_ids[0]])]) for p in params]

    def apply_model(self, fn):
        model = types.SimpleNamespace(load_weights=lambda weights: self.loaded.append(dict(weights)))
        fn(model)


def test_vllm_backend_contract_against_a_fake_vllm(monkeypatch, tmp_path):
    from hpd.models import load_model
    from hpd.vllm_generate import VLLMGenerate

    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # what the backend sets; undone after the test
    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    backend = VLLMGenerate(gpu_memory_utilization=0.4)
    backend.after_optimizer_step(model)  # before the engine exists: nothing to sync
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0, top_p=1.0, top_k=0)
    prompts = [tok.encode("ab"), tok.encode("cd"), tok.encode("ef")]
    a = backend.generate(model, tok, prompts, settings, seed=3)
    llm = _FakeLLM.instances[-1]
    assert llm.kw["gpu_memory_utilization"] == 0.4 and llm.kw["dtype"] == "float32"
    sent, params = llm.calls[0]
    assert [p["prompt_token_ids"] for p in sent] == prompts
    assert all(p.max_tokens == 5 and p.temperature == 1.0 and p.top_k == -1 for p in params)
    assert len({p.seed for p in params}) == 3  # one seed per prompt ...
    assert backend.generate(model, tok, prompts, settings, seed=3) == a  # ... a pure function of the call's seed
    assert [p.seed for p in llm.calls[1][1]] == [p.seed for p in params]
    assert [p.seed for p in (backend.generate(model, tok, prompts, settings, seed=4), llm.calls[2][1])[1]] != \
        [p.seed for p in params]
    assert len(_FakeLLM.instances) == 1  # one engine, started once

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    backend.after_optimizer_step(model)
    synced = llm.loaded[-1]
    assert synced.keys() == model.state_dict().keys()
    assert all(torch.equal(synced[k], v) for k, v in model.state_dict().items())  # the weights after the step

    other, _ = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    with pytest.raises(HPDError, match="serves the one model"):
        backend.generate(other, tok, prompts, settings, seed=0)
