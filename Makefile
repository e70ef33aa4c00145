# `make demo` and `make test` each create (or reuse) ./.venv and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-roundings test-all bench peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 installs from the local CPU wheel, offline.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,text]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sde_diffusion.demo

test: $(STAMP)
	$(PY) -m pytest -q

# The tests marked `numeric` (pytestmark = pytest.mark.numeric) again on torch's non-vectorised
# kernels (other roundings than AVX2/AVX-512): a result that holds on only one set of roundings fails here.
test-roundings: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m 'numeric and not slow'

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# k-diffusion for the benchmarks' peer columns (only its sampling module is loaded). Without its dependencies:
# they include torchvision, whose PyPI build does not import beside the local torch wheel and, once installed,
# breaks every `import lightning` (torchmetrics imports it when present). The sampling module needs torchdiffeq.
peers: $(STAMP)
	$(PY) -m pip install --quiet "torchdiffeq>=0.2" "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(PY) -m pip install --quiet --no-deps "k-diffusion==0.1.1"

bench: $(STAMP)
	$(PY) -m benchmarks.samplers

clean:
	rm -rf $(VENV) outputs
