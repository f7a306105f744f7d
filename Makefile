# One-command set-up on a fresh machine: a virtual environment with torch (CPU) and rlhfkit.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned: on these machines pip finds a local CPU wheel for exactly this version. Elsewhere
# PyPI's Linux wheel is the CUDA build (several GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU build from PyTorch's own index instead.
TORCH  := torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test lint bench compare trl-env clean

$(BIN)/rlhfkit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/rlhfkit

demo: $(BIN)/rlhfkit
	HF_HUB_OFFLINE=1 $(BIN)/rlhfkit demo --out demo_out

test: $(BIN)/rlhfkit
	$(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: $(BIN)/rlhfkit
	for m in ceiling sft rm dpo grpo ppo generate; do HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py $$m; done

# TRL beside rlhfkit (benchmarks/compare.py): its own environments, TRL 1.16 and, for PPO, TRL 1.12
trl-env: $(BIN)/rlhfkit
	test -x .venv-trl/bin/python || $(PYTHON) -m venv .venv-trl
	.venv-trl/bin/pip install -q $(TORCH) && .venv-trl/bin/pip install -q trl==1.16.0 $(TORCH)
	.venv-trl/bin/pip install -q --no-deps -e .
	test -x .venv-trl112/bin/python || $(PYTHON) -m venv .venv-trl112
	.venv-trl112/bin/pip install -q $(TORCH) && .venv-trl112/bin/pip install -q trl==1.12.0 $(TORCH)
	.venv-trl112/bin/pip install -q --no-deps -e .

compare: trl-env
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/compare.py sft rm dpo grpo ppo generate

clean:
	rm -rf $(VENV) .venv-trl .venv-trl112 .bench demo_out runs
