# Everything a fresh machine needs: `make demo` and `make test` set up .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup browser test demo bench bench-serve clean

setup: $(STAMP)

# torch is pinned and installed first: the pin takes the local CPU build; a looser
# requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The playground's test drives Debian's chromium (Playwright with executable_path, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "warning: could not install chromium (apt-get, as root); the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/lorakit demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) build src/*.egg-info
