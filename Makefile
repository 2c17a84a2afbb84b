# Two entry points: `make chat` (talk to the bundled model) and `make test`.
# Both create .venv on first use; only python3 is needed on the machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: chat test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	# DISABLE_CUDA: hqq otherwise tries to compile CUDA extensions.
	DISABLE_CUDA=1 $(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

chat: $(STAMP)
	$(VENV)/bin/offload-chat $(ARGS)

test: $(STAMP)
	@$(PY) -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected; that is a failure" >&2; exit 1; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info
