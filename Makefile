# Two commands on a fresh machine:
#   make demo   # set everything up, reconstruct the bundled example
#   make test   # set everything up, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-fast bench bench-quick bench-claims bench-claims-standard prior-eval clean

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

# performance figures of the README (native projector vs astra, U-Net vs matmul, memory vs slices)
bench: setup
	$(BIN)/python scripts/bench_projector.py
	$(BIN)/python scripts/bench_unet.py
	$(BIN)/python scripts/bench_memory.py

# the README's results section: the quick suite (about 12 minutes on a 2-core CPU)
bench-quick: setup
	$(BIN)/d3ip benchmark --suite quick -o docs/results --overwrite

# issue 5's quality claims at a CPU user's settings (128x128, fast preset; ~10 min with 2 threads)
bench-claims: setup
	$(BIN)/d3ip benchmark --suite claims -o docs/claims --overwrite

# the same claims at the paper's sampler settings (standard preset), at 64x64 to fit a CPU (~18 min with 2 threads)
bench-claims-standard: setup
	$(BIN)/d3ip benchmark --suite claims --preset standard --grid 64 -o docs/claims_standard_64 --overwrite

# quality of the bundled prior against a tuned TV denoiser, appended to the curve of the
# training stage it came from ("source" in src/d3ip_cli/prior/weights/phantom_cpu.json)
PRIOR_STAGE := training/prior_gpu_h100
prior-eval: setup
	$(BIN)/python scripts/eval_prior.py --csv $(PRIOR_STAGE)/quality.csv --plot $(PRIOR_STAGE)/quality.png \
	  --samples-png docs/prior/samples.png --sample-steps 50

clean:
	rm -rf $(VENV) out
