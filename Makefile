# The README's two commands. Each makes a virtual environment in .venv (Python ≥ 3.11 and pip, no GPU, no
# network but the package registry) and installs what it needs:
#   make demo    install mmctl (with bitsandbytes, for QLoRA) and run the tiny end-to-end pipeline and its report
#   make test    install mmctl with its test extras, run ruff and the test suite (`.venv/bin/pytest -m "not slow"`
#                leaves out the multi-process and kill -9 tests: the quick loop while developing)
#   make bench   every benchmark in one run (benchmarks/README.md), after the tiny models it decodes with
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1

demo: $(BIN)/mmctl
	$(MAKE) -C recipes/tiny MMCTL=$(abspath $(BIN))/mmctl
	@echo "the report: recipes/tiny/out/report/report.md"

test: $(VENV)/.dev
	$(BIN)/ruff check mmctl tests benchmarks
	$(BIN)/python -m pytest

$(BIN)/mmctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[quant]'
	touch $@

$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

bench: $(VENV)/.dev $(BIN)/mmctl
	$(MAKE) -C recipes/tiny out/pretrain/manifest.json out/pretrain-draft/manifest.json MMCTL=$(abspath $(BIN))/mmctl
	PY=$(BIN)/python benchmarks/run_all.sh

clean:
	rm -rf $(VENV) recipes/*/out

.PHONY: demo test bench clean
