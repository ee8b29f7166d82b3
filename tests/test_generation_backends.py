"""Choosing the generation backend (`regime.backend`), and what the vLLM backend does without a
real engine: its refusals, the weights it would serve, its answers to a broken server. The real
engine's tests are tests/test_vllm_rollouts.py (slow; they need `make engine`)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from hpd.config import load_config
from hpd.errors import HPDError
from hpd.models.loading import apply_lora, load_model
from hpd.responses.regimes import SamplingSettings
from hpd.responses.backends import select_backend
from hpd.responses.rollout import HFGenerate
from hpd.training.trainer import Trainer
from hpd.responses.vllm_generate import VLLMGenerate, merged_state_dict

pytestmark = pytest.mark.usefixtures("single_torch_thread")
MISSING = "/nonexistent/.venv-vllm/bin/python"


def tiny(**kw):
    return load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32, **kw})


def test_auto_and_hf_select_hf_generate_on_a_cpu_without_a_server(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert type(select_backend("auto")) is HFGenerate
    assert type(select_backend("hf", url="http://127.0.0.1:1")) is HFGenerate


def test_auto_selects_vllm_with_a_server_or_a_gpu_and_the_engine(monkeypatch, tmp_path):
    assert isinstance(select_backend("auto", url="http://127.0.0.1:1"), VLLMGenerate)
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = select_backend("auto", python=str(python))
    assert isinstance(backend, VLLMGenerate) and backend.server is None  # started at the first rollout
    assert type(backend.for_teacher()) is HFGenerate
    assert type(select_backend("auto", python=MISSING)) is HFGenerate
    monkeypatch.setenv("HPD_ENGINE_PYTHON", MISSING)  # hpd.engine's default python, absent
    assert type(select_backend("auto")) is HFGenerate
    monkeypatch.setenv("HPD_ENGINE_PYTHON", str(python))
    assert isinstance(select_backend("auto"), VLLMGenerate)


def test_vllm_without_its_engine_environment_is_a_clear_error():
    with pytest.raises(HPDError, match=r"regime.vllm_python=/nonexistent.* does not exist: install the engine with `make engine`"):
        select_backend("vllm", python=MISSING)
    with pytest.raises(HPDError, match="unknown generation backend 'vlm'"):
        select_backend("vlm")


def test_a_run_asking_for_vllm_without_the_engine_stops_before_training(repo_root, tmp_path, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "regime.name=student", "regime.backend=vllm",
                                            f"regime.vllm_python={MISSING}", "log.progress=false", "log.tensorboard=off"])
    with pytest.raises(HPDError, match="make engine"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_served_weights_of_a_lora_student_are_merged_into_a_copy():
    model, _ = tiny()
    model = apply_lora(model, rank=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    served = merged_state_dict(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in own.items())  # the student untouched
    assert not any("lora" in k or "base_layer" in k for k in served)
    base, _ = tiny()
    assert served.keys() == base.state_dict().keys()  # the plain model's checkpoint names
    x = torch.tensor([[1, 2, 3, 4]])
    base.load_state_dict(served)
    with torch.no_grad():
        assert torch.allclose(base(x).logits, model(x).logits, atol=1e-5)


def test_tied_weights_are_written_under_both_names(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny()
    model.lm_head.weight = model.get_input_embeddings().weight  # tied
    state = merged_state_dict(model)
    save_file(state, str(tmp_path / "w.safetensors"))  # refuses tensors sharing memory
    back = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(back["lm_head.weight"], back["model.embed_tokens.weight"])


class _BrokenServer(BaseHTTPRequestHandler):
    """Answers /v1/models, then each completion as `answer` says."""

    answer: dict = {}

    def log_message(self, *a):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"data": [{"id": "m"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        code, body = type(self).answer.get(self.path, (200, {}))
        self._send(code, body)


@pytest.mark.parametrize("answer, match", [
    ((500, {"error": {"message": "EngineCore encountered an issue"}}), "failed a rollout: HTTP 500 EngineCore"),
    ((200, {"choices": []}), "without token ids"),
    ((200, b'{"choices": [{"token_ids": [1, 2'), "malformed or truncated response"),
    ((200, {"choices": [{"token_ids": list(range(9))}]}), "answered 9 tokens for a rollout of at most 4"),
])
def test_a_broken_server_is_a_clear_error_naming_it(answer, match):
    model, tok = tiny()
    handler = type("H", (_BrokenServer,), {"answer": {"/v1/completions": answer}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        backend = VLLMGenerate(url=url)
        with pytest.raises(HPDError, match=match) as e:
            backend.generate(model, tok, [[1, 2, 3]], SamplingSettings(max_new_tokens=4), seed=0)
        assert url in str(e.value)
        assert backend.stats["syncs"] == 1  # the student's weights were pushed before the first rollout
    finally:
        server.shutdown()
