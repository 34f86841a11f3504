# The README's commands. Everything runs offline but for the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cptquant-installed
OUT ?= out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Mixed-precision MiniLM (embedded, real pretrained weights) into out/.
demo: $(STAMP)
	$(BIN)/cptq-export --method tdmpq --max-size-mb 16 -o $(OUT)/model.onnx --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m cptquant.bench --out docs

bench-quick: $(STAMP)
	$(BIN)/python -m cptquant.bench --out docs --quick

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
