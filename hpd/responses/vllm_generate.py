"""Student rollouts sampled by a vLLM server, the student's weights pushed to it after each step.

`VLLMGenerate` is a `hpd.responses.rollout.GenerationBackend` (`regime.backend=vllm`). vLLM lives in its own
environment (`make engine`: its pins conflict with the project's), so the backend talks to a vLLM
server process over HTTP rather than importing vLLM:

- the server: started by the backend at the first rollout (`hpd.engine.EngineServer`, as
  `rollout_server` sets it up), from the engine environment's python (`regime.vllm_python`, default
  `hpd.engine`'s), on a directory holding the student's config and weights, on 127.0.0.1 and a
  free port, stopped with the run; or one already running, given by URL (`regime.vllm_url`, started with
  `VLLM_SERVER_DEV_MODE=1` on this machine, since the weights travel through files);
- rollouts: one `/v1/completions` request per prompt (token-id prompt, the sampling settings,
  the stop ids HF `generate` stops at, and a seed derived from the call's seed and the prompt's
  index), sent together so that the engine batches them; the completion's token ids come back
  through the first stop token, as `hpd.responses.rollout.generate_completions` returns them;
- the weight sync: after an optimizer step the backend marks the served weights stale; the next
  rollout first writes the student's weights (a LoRA student's merged into a copy) as one
  safetensors file atomically, asks the server to re-read them (`POST /collective_rpc
  {"method": "reload_weights"}`) and resets its prefix cache (KV computed with the old weights).
  Steps without rollouts (mixed runs' off-policy steps, reused rollout batches) push nothing.

What is checked against the real engine (tests/test_vllm_rollouts.py): greedy rollouts equal HF
`generate` on the bundled models, sampled first tokens follow the model's distribution as HF's
do, and after an optimizer step the rollouts are the updated student's. Only on CPUs so far; on a
GPU the server is started the same way and takes `regime.vllm_gpu_memory` of it (not yet run).

    >>> from hpd.responses.vllm_generate import per_prompt_seeds
    >>> a = per_prompt_seeds(7, 3)
    >>> a == per_prompt_seeds(7, 3), len(set(a)), a[:2] == per_prompt_seeds(8, 3)[:2]
    (True, 3, False)
"""

from __future__ import annotations

import copy
import os
import shlex
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from hpd.engine import INSTALL_HINT, EngineServer, engine_python
from hpd.errors import HPDError
from hpd.files import atomic_write, atomic_write_text
from hpd.responses.rollout import GenerationBackend, HFGenerate, _eos_ids
from hpd.seeds import derive_seed

WEIGHTS_FILE = "model.safetensors"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def per_prompt_seeds(seed: int, n: int) -> list[int]:
    """The engine seed of each of `n` prompts of a call seeded `seed` (distinct, reproducible)."""
    return [derive_seed(seed, i, "vllm") % 2**31 for i in range(n)]


def resolve_engine(python: str | os.PathLike | None = None) -> Path:
    """The engine environment's python: `python` (regime.vllm_python), else `hpd.engine`'s
    (`$HPD_ENGINE_PYTHON`, else the repository's `.venv-vllm`), checked to exist."""
    if python is None:
        return engine_python()
    if not Path(python).expanduser().is_file():
        raise HPDError(f"regime.vllm_python={python} does not exist: {INSTALL_HINT}")
    return Path(python).expanduser()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group `pgid` (Linux /proc)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def log_errors(path: Path, lines: int = 3) -> str:
    """The last error lines of a server's log (else its last lines), for one-line messages."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [ln.strip() for ln in text if "Error" in ln and "Warning" not in ln]
    return " | ".join((errors or [ln.strip() for ln in text])[-lines:])[-600:]


def rollout_server(model_dir: Path, *, python: Path, dtype: str, max_model_len: int | None, extra_args: str,
                   gpu_memory_utilization: float | None, log: Path) -> EngineServer:
    """An `EngineServer` (not started) set up to serve rollouts of the student in `model_dir`: token
    ids in and out (no tokenizer), the model's sampling defaults ignored, the weight-reload and
    cache-reset routes on (`VLLM_SERVER_DEV_MODE=1`); on a GPU `gpu_memory_utilization` of it."""
    args = ["--skip-tokenizer-init", "--generation-config", "vllm"]
    if gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    server = EngineServer(model_dir, dtype=dtype, max_model_len=max_model_len, max_logprobs=1, python=python,
                          kv_cache_gib=None if gpu_memory_utilization is not None else 1.0,
                          extra_args=args + shlex.split(extra_args), log=log)
    server.env["VLLM_SERVER_DEV_MODE"] = "1"
    if gpu_memory_utilization is None:
        server.worker_in_engine_core()  # its busy-polling worker would take a core from the trainer
    return server


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights to serve, under the Hugging Face checkpoint names: a LoRA student's adapters merged
    into a copy of it (the student itself untouched); tensors sharing memory (tied embeddings) copied
    apart, as a safetensors file cannot hold them twice."""
    from hpd.models.loading import is_peft_model

    if is_peft_model(model):
        with torch.no_grad():
            model = copy.deepcopy(model).merge_and_unload()
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        key = t.untyped_storage().data_ptr()
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


class VLLMGenerate(GenerationBackend):
    """Rollouts from a vLLM server holding a copy of the student (see the module docstring).

    url: a running server (None: start one); python: the engine environment's python; args: extra
    server arguments; max_model_len: the longest prompt + completion the server admits;
    request_timeout: seconds one completion may take."""

    def __init__(self, *, url: str | None = None, python: str | None = None, args: str = "",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 request_timeout: float = 600.0, startup_timeout: float = 600.0):
        if url is None:
            resolve_engine(python)  # missing engine: refused now, before any training
        self.given_url = url.rstrip("/") if url else None
        self.url = self.given_url
        self.python, self.args, self.max_model_len = python, args, max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.request_timeout, self.startup_timeout = request_timeout, startup_timeout
        self.server: EngineServer | None = None
        self.model_name: str | None = None
        self.model_ref: weakref.ref | None = None
        self.stale = True  # whether the served weights lag the student's
        self._dir: tempfile.TemporaryDirectory | None = None
        self._local = threading.local()
        self.stats = {"rollout_s": 0.0, "rollout_tokens": 0, "syncs": 0, "sync_s": 0.0, "last_sync_s": 0.0}

    def for_teacher(self) -> GenerationBackend:
        # One server holds one model: the teacher's generations are made once and cached, with HF.
        return HFGenerate()

    # ---- HTTP ----

    def _post(self, path: str, payload: dict[str, Any], what: str) -> Any:
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        try:
            r = s.post(self.url + path, json=payload, timeout=(10.0, self.request_timeout))
        except requests.RequestException as e:
            raise HPDError(f"the vLLM server {self.url} did not answer {what} ({type(e).__name__}: {str(e)[:200]})"
                           f"{self._hint()}") from None
        if r.status_code != 200:
            try:
                msg = r.json().get("error", {}).get("message", "") or r.text
            except ValueError:
                msg = r.text
            raise HPDError(f"the vLLM server {self.url} failed {what}: HTTP {r.status_code} {str(msg)[:300]}"
                           f"{self._hint()}")
        try:
            return r.json() if r.content else None
        except ValueError:
            raise HPDError(f"the vLLM server {self.url} answered {what} with a malformed or truncated response "
                           f"({len(r.content)} bytes that are not JSON){self._hint()}") from None

    def _hint(self) -> str:
        if self.server is not None:
            return f"; its log says: {log_errors(self.server.log_path)} ({self.server.log_path})"
        return "; check that it runs (started with VLLM_SERVER_DEV_MODE=1, on this machine)"

    # ---- the server and its weights ----

    def _start(self, model) -> None:
        from hpd.models.loading import is_peft_model

        self._dir = tempfile.TemporaryDirectory(prefix="hpd-vllm-")
        weights = Path(self._dir.name) / "model"
        base = model.get_base_model() if is_peft_model(model) else model
        dtype = _DTYPES.get(next(model.parameters()).dtype)
        if dtype is None:
            raise HPDError(f"regime.backend=vllm serves float32, bfloat16 or float16 students, not "
                           f"{next(model.parameters()).dtype}")
        if self.url is None:
            # The server starts on the student's config and its weights of this moment.
            atomic_write_text(weights / "config.json", base.config.to_json_string())
            self._write_weights(model, weights)
            max_len = self.max_model_len
            limit = getattr(base.config, "max_position_embeddings", None)
            if max_len and limit:
                max_len = min(max_len, int(limit))
            self.server = rollout_server(
                weights, python=resolve_engine(self.python), dtype=dtype, max_model_len=max_len, extra_args=self.args,
                gpu_memory_utilization=self.gpu_memory_utilization if torch.cuda.is_available() else None,
                log=Path(self._dir.name) / "server.log")
            self._finalizer = weakref.finalize(self, self.server.stop)  # also at interpreter exit
            self.server.start(timeout=self.startup_timeout)
            self.url = self.server.url
            self.stale = False
        self._weights_dir = weights
        import requests

        try:
            self.model_name = requests.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as e:
            raise HPDError(f"the vLLM server {self.url} did not name its model at /v1/models ({type(e).__name__})"
                           f"{self._hint()}") from None
        self.model_ref = weakref.ref(model)

    def _write_weights(self, model, directory: Path) -> None:
        from safetensors.torch import save_file

        state = merged_state_dict(model)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))

    def push_weights(self, model) -> float:
        """Serve `model`'s current weights; returns the seconds the sync took (write + reload)."""
        t0 = time.perf_counter()
        self._write_weights(model, self._weights_dir)
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(self._weights_dir)}},
                   "to reload the student's weights")
        # Cached prefixes hold keys and values computed with the old weights.
        self._post("/reset_prefix_cache", {}, "to reset its prefix cache")
        dt = time.perf_counter() - t0
        self.stale = False
        self.stats["syncs"] += 1
        self.stats["sync_s"] += dt
        self.stats["last_sync_s"] = dt
        return dt

    def after_optimizer_step(self, model) -> None:
        # Pushed before the next rollout, so that steps without one (off-policy steps of a mixed run,
        # reused rollout batches) cost nothing.
        self.stale = True

    # ---- rollouts ----

    def generate(self, model, tokenizer, prompt_ids, settings, *, seed):
        if self.model_ref is None:
            self._start(model)
        elif self.model_ref() is not model:
            raise HPDError("a vLLM backend serves the one model it was started with; build another for another model")
        if self.stale:
            self.push_weights(model)
        if not prompt_ids:
            return []
        empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
        if empty:
            raise HPDError(f"prompt(s) {empty[:5]} are empty: every prompt needs at least one token (e.g. bos)")
        s = settings
        stops = _eos_ids(model, tokenizer)
        sampling = (dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else 0)
                    if s.temperature > 0 else dict(temperature=0.0))

        def one(args):
            prompt, prompt_seed = args
            body = self._post("/v1/completions", {
                "model": self.model_name, "prompt": [int(t) for t in prompt], "max_tokens": s.max_new_tokens,
                "seed": prompt_seed, "stop_token_ids": stops, "return_token_ids": True,
                "repetition_penalty": 1.0, "min_p": 0.0, **sampling}, "a rollout")
            try:
                ids = [int(t) for t in body["choices"][0]["token_ids"]]
            except (TypeError, KeyError, IndexError, ValueError):
                raise HPDError(f"the vLLM server {self.url} answered a rollout without token ids (malformed or "
                               "truncated response)") from None
            if not 0 < len(ids) <= s.max_new_tokens:
                raise HPDError(f"the vLLM server {self.url} answered {len(ids)} tokens for a rollout of at most "
                               f"{s.max_new_tokens}")
            # Through the first stop token, as HF generate's completions are cut.
            cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
            return ids[:cut]

        t0 = time.perf_counter()
        jobs = list(zip(prompt_ids, per_prompt_seeds(seed, len(prompt_ids))))
        with ThreadPoolExecutor(max_workers=min(64, len(jobs)), thread_name_prefix="hpd-vllm") as pool:
            out = list(pool.map(one, jobs))
        self.stats["rollout_s"] += time.perf_counter() - t0
        self.stats["rollout_tokens"] += sum(len(o) for o in out)
        return out

    def metrics(self) -> dict[str, float]:
        """Cumulative figures for the run's log: weight syncs and their seconds, server CPU seconds."""
        out = {"vllm_syncs": float(self.stats["syncs"]), "vllm_sync_s": self.stats["sync_s"],
               "vllm_last_sync_s": self.stats["last_sync_s"]}
        if self.server is not None:
            out["vllm_server_cpu_s"] = group_cpu_seconds(self.server.proc.pid) if self.server.alive() else 0.0
        return out

    def close(self) -> None:
        """Stop the server this backend started (a server given by URL is left running)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self.model_ref, self.url, self.stale = None, self.given_url, True


__all__ = ["VLLMGenerate", "log_errors", "resolve_engine", "rollout_server",
           "group_cpu_seconds", "merged_state_dict", "per_prompt_seeds"]
