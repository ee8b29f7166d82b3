"""Start and stop an inference engine (vLLM's OpenAI-compatible server) for a model directory.

The engine lives in its own environment (`make engine` builds `.venv-vllm` in the repository
root: its pins conflict with the project's), so it always runs as a separate process, started
with that environment's Python. `EngineServer` starts it on a host and port (a free port on
127.0.0.1 by default), waits until `/health` answers, and on `stop()` (or leaving the `with`
block) kills its whole process group (the API server, the engine core and its workers).
`hpd serve-teacher MODEL` is the command around it; the tests' fixture and the served-teacher
benchmark use it too.

    >>> from hpd.engine import engine_python, free_port
    >>> isinstance(free_port(), int)
    True
    >>> engine_python(required=False) is None or engine_python(required=False).name.startswith("python")
    True

With the engine installed (`make engine`):

    with EngineServer("hpd/assets/teacher") as server:       # about a minute to start on a CPU
        print(server.url)                                     # http://127.0.0.1:PORT
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpd.errors import HPDError

# The environment `make engine` builds, beside the package's checkout.
ENGINE_ENV = Path(__file__).resolve().parents[1] / ".venv-vllm"
INSTALL_HINT = "install the engine with `make engine` (it builds .venv-vllm), or set HPD_ENGINE_PYTHON to a Python with vLLM"


def engine_python(required: bool = True) -> Path | None:
    """The Python of the engine environment: `$HPD_ENGINE_PYTHON`, else `.venv-vllm/bin/python`.

    None when there is none and `required` is false; else an `HPDError` saying how to install it.
    """
    env = os.environ.get("HPD_ENGINE_PYTHON")
    path = Path(env) if env else ENGINE_ENV / "bin" / "python"
    if path.exists():
        return path
    if not required:
        return None
    raise HPDError(f"no inference engine at {path}: {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineServer:
    """vLLM's OpenAI-compatible server for `model`, in its own process group.

    model:          a Hugging Face model directory (the teacher).
    host, port:     where it listens (port None: a free one).
    dtype:          the engine's compute dtype (float32: log-probabilities comparable to an fp32 teacher).
    max_model_len:  the longest sequence it accepts (prompt + one generated token); None = the model's.
    max_logprobs:   the most log-probabilities per position a request may ask for (the top-K).
    threads:        CPU threads of the engine (OMP_NUM_THREADS), None = the engine's default.
    cpus:           CPU list to pin the engine to (`taskset -c CPUS`), e.g. "1"; None = no pinning.
    kv_cache_gib:   the engine's KV cache in GiB (`--kv-cache-memory-bytes`; a small model's short
                    sequences need little); None = the engine's default (on GPUs: its share of memory).
    extra_args:     further command-line arguments for the server.
    log:            the file its output goes to (default: a temporary file, shown when it fails).
    """

    def __init__(self, model: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                 dtype: str = "float32", max_model_len: int | None = None, max_logprobs: int = 64, threads: int | None = None,
                 cpus: str | None = None, kv_cache_gib: float | None = None, extra_args: list[str] | None = None,
                 log: str | os.PathLike | None = None, python: str | os.PathLike | None = None):
        self.model = str(Path(model).resolve()) if Path(model).exists() else str(model)
        if not Path(self.model).is_dir():
            raise HPDError(f"'{model}' is not a model directory: pass a Hugging Face model directory to serve")
        self.host, self.port = host, port or free_port(host)
        self.python = Path(python) if python else engine_python()
        self.command = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                        "--dtype", dtype, "--max-logprobs", str(max_logprobs),
                        "--host", host, "--port", str(self.port), "--disable-uvicorn-access-log", *(extra_args or [])]
        if max_model_len is not None:
            self.command += ["--max-model-len", str(max_model_len)]
        if kv_cache_gib is not None:
            self.command += ["--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30))]
        if cpus is not None:
            self.command = ["taskset", "-c", str(cpus), *self.command]
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.env.pop("PYTHONPATH", None)  # the engine's environment, not this checkout's packages
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="hpd-engine-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 600.0) -> EngineServer:
        """Start the server and wait until `/health` answers 200; an `HPDError` with the end of its
        log if it exits or is not healthy within `timeout` seconds."""
        import requests

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)  # its own process group: stop() ends all of it
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HPDError(f"the engine serving {self.model} exited with code {self.proc.returncode} before it "
                               f"was ready; the end of its log ({self.log_path}):\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise HPDError(f"the engine serving {self.model} was not healthy after {timeout:.0f} s; the end of "
                               f"its log ({self.log_path}):\n{self.log_tail()}")
            time.sleep(1.0)

    def worker_in_engine_core(self) -> EngineServer:
        """Run the model inside vLLM's engine-core process (its `uni` executor; on a CPU): by default
        the engine core hands each batch to a worker process of its own, and the two busy-poll their
        shared queue for about a second after every request, a core taken from whatever shares it
        (measured: 0.9 CPU s per idle 5 s, against 0.04 with the worker inside). The API server
        process stays separate. `VLLM_ENABLE_V1_MULTIPROCESSING` set in the environment wins. Call
        before `start`."""
        self.env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if self.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            self.command += ["--distributed-executor-backend", "uni"]
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """End the server's whole process group: SIGTERM, then SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # The group may outlive its leader for a moment (the engine core's workers).
                deadline = time.monotonic() + wait
                while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _group_alive(self.proc.pid):
                    break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def __enter__(self) -> EngineServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def serve(model: str, *, host: str, port: int, worker_in_core: bool | None = None, **kwargs) -> None:
    """Run a teacher server in the foreground until interrupted (`hpd serve-teacher`).

    worker_in_core: the model inside the engine-core process (`EngineServer.worker_in_engine_core`);
    None: on a machine without `nvidia-smi` (a CPU engine, where a separate worker's busy-polling
    costs about a third of the server's CPU per answer, benchmarks/RESULTS.md), not on a GPU machine.
    """
    server = EngineServer(model, host=host, port=port, **kwargs)
    if worker_in_core is None:
        worker_in_core = shutil.which("nvidia-smi") is None
    if worker_in_core:
        server.worker_in_engine_core()

    def interrupted(*_):
        raise KeyboardInterrupt

    # Ctrl-C and a plain kill both end the engine's processes (the finally below); SIGINT too when
    # a shell started this command in the background with it ignored.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    print(f"[hpd] starting the engine for {server.model} (log: {server.log_path})", file=sys.stderr, flush=True)
    try:
        server.start()
        print(f"[hpd] serving {server.model} at {server.url}  (train with: hpd train teacher.server={server.url})",
              flush=True)
        while server.alive():
            time.sleep(1.0)
        raise HPDError(f"the engine exited with code {server.proc.returncode}; the end of its log:\n{server.log_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


__all__ = ["ENGINE_ENV", "EngineServer", "INSTALL_HINT", "engine_python", "free_port", "serve"]
