# Two commands do all the set-up on a fresh machine:  make run  (main job)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-fast bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0   # the local CPU wheel; an unpinned torch pulls a CUDA build
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/nmsparse train

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)   # the quick lane while working: tests under ~5 s each (CI and `make test` run all)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/nmsparse bench patterns --out docs/bench-patterns.md
	$(VENV)/bin/nmsparse bench transposable --out docs/bench-transposable.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
