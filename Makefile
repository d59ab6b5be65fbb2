# Two commands do all the set-up: `make demo` and `make test`. Both are quick when nothing changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BUILDER_STAMP := $(VENV)/.builder

.PHONY: setup demo test lint bench fuzz browser sweep clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[torch,tf,dev,ray]"
	touch $@

# The builder venv (onnxruntime-training-cpu 1.19.2) lives apart from the main one.
$(BUILDER_STAMP): $(STAMP) engine/compile/builder.py
	$(BIN)/onnxplain builder install
	touch $@

setup: $(STAMP) $(BUILDER_STAMP)

demo: setup
	$(BIN)/python -m models.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest

# A longer property-based search over model files than the 120 cases per property in `make test`.
fuzz: setup
	ONNXPLAIN_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest tests/test_fuzz_models.py -q

# Debian's chromium for the report tests (tests/test_report_browser.py); playwright drives it, no
# browser download. Needs root for apt; a no-op where chromium is installed.
browser:
	@command -v chromium >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }; }

bench: setup
	$(BIN)/python -m bench.gradient

# The real-architecture sweep (issue #9 §1): every torchvision classification model, every Keras
# application and ~90 timm models with random weights, each exported, compiled and its input
# gradient checked against the framework (and float64 torch) in a subprocess of its own; writes
# docs/architectures.md and docs/architectures.json. Hours on 2 cores: niced, one thread per
# runtime. tests/test_architectures.py runs six of them in `make test`.
sweep: setup
	nice -n 15 $(BIN)/python -m bench.architectures

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
