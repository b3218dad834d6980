# afm: the two entry points are `make run` (the main job) and `make test` (the test suite).
# Both create the virtual environment themselves. TORCH_SPEC installs PyTorch first: the default is
# the CPU build; on a GPU machine pass the CUDA build you want and the Triton it ships with, e.g.
# `make test TORCH_SPEC=torch TRITON_SPEC=triton`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Triton runs the GPU attention kernels; on CPU machines its interpreter tests them.
TRITON_SPEC ?= triton==3.6.0
BIN := $(VENV)/bin

.PHONY: run test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

# The main job: the nano speedrun, raw text to a chat model with a report card
# (runs/speedrun-nano/report.md). Running it again resumes where it stopped.
run: $(BIN)/.installed
	$(BIN)/afm speedrun --preset nano --out runs/speedrun-nano

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
