# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision pinned to the builds this project is tested with
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow gpu-check lint docs docs-cli bench-overhead clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdforge demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

docs: $(STAMP)
	$(BIN)/python -c "import mkdocs, material, mkdocstrings" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict   # into build/site; open build/site/index.html

docs-cli: $(STAMP)
	$(BIN)/python -m kdforge.report.cli_doc > docs/cli.md
	$(BIN)/python -m kdforge.report.recipe_doc > docs/recipe-keys.md

# On a machine with a CUDA GPU (no network, <= 8 min): the CUDA test subset, then the throughput table to paste
# into docs/benchmarks/gpu.md with the card's name. Without a GPU the tests skip and the table refuses.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/test_gpu.py
	$(BIN)/python scripts/gpu_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

bench-overhead: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 taskset -c 0 $(BIN)/python benchmarks/engine_overhead.py --rounds 7 --threads 1

clean:
	rm -rf $(VENV) runs
