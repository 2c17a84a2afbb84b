# Two entry points: `make chat` (talk to the bundled model) and `make test` (what CI runs first).
# Both create .venv on first use with the tested versions of constraints.txt; only python3 is needed.
# `make test-latest` (CI runs it second) runs the same suite in .venv-latest on the newest versions that
# pyproject's ranges allow, re-resolved every run, so a new release that breaks us fails here first.
PYTHON ?= python3
VENV ?= .venv
LATEST ?= .venv-latest
LOCK := constraints.txt
# torch first and pinned (the CPU wheel): an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# The parity tests' reference, pinned by the lock.
REFERENCE := transformers==5.23.0
STAMP := $(VENV)/.installed

.PHONY: chat test test-latest test-cpus lock clean

# A changed lock or pyproject rebuilds the venv from scratch, so it holds the lock and nothing else.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	# DISABLE_CUDA: hqq otherwise tries to compile CUDA extensions.
	DISABLE_CUDA=1 $(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

chat: $(STAMP)
	$(VENV)/bin/offload-chat $(ARGS)

# Names the versions under test, then runs pytest; its exit 5 (nothing collected) is a failure, not a pass.
VERSIONS := torch transformers kernels tokenizers safetensors huggingface_hub hqq bitsandbytes triton numpy
define run_tests
	@$(1)/bin/python -c "import importlib.metadata as m, sys; \
	print('versions:', ', '.join(f'{n} {m.version(n)}' for n in sys.argv[1:] if list(m.distributions(name=n))))" $(VERSIONS)
	@$(1)/bin/python -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: no tests were collected; that is a failure" >&2; exit 1; fi; \
	exit $$rc
endef

test: $(STAMP)
	$(call run_tests,$(VENV))

# Everything but torch at the newest release the ranges allow (torch stays the local CPU wheel).
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH)"
	DISABLE_CUDA=1 $(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH)"
	$(call run_tests,$(LATEST))

# The CPU-dependent tests again on emulated CPUs (qemu user mode): Haswell (no AVX-512) and SandyBridge (no AVX2);
# which tests and why in .ci/test-cpus.
test-cpus: $(STAMP)
	.ci/test-cpus $(VENV)

# Re-resolve the tested set (then run `make test` and commit constraints.txt).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "$(TORCH)"
	DISABLE_CUDA=1 .venv-lock/bin/python -m pip install --quiet -e ".[dev]" "$(REFERENCE)"
	{ sed -n '1,3p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock build *.egg-info
