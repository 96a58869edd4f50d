# Two commands on a fresh machine:
#   make demo   # set everything up, reconstruct the bundled example
#   make test   # set everything up, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,codecs]'
	touch $(STAMP)

setup: $(STAMP)

# dicom3tools (dciodvfy) and ismrmrd-tools are test oracles from Debian; installed when missing.
system-deps:
	@command -v dciodvfy >/dev/null 2>&1 && command -v ismrmrd_generate_cartesian_shepp_logan >/dev/null 2>&1 || \
	 { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	   $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools ismrmrd-tools >/dev/null; }

demo: setup
	bash examples/demo.sh

test: setup system-deps
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python scripts/bench_projector.py

clean:
	rm -rf $(VENV) out
