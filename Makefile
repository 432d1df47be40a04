# One task runner. `make quickstart` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pollinate-installed

.PHONY: install quickstart test test-slow ci lint fix typecheck bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch first, so nothing below can pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/pollinate run configs/quickstart.toml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# pytest exits 5 when no test carries the marker: not a failure.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

ci: test test-slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# mypy checks the package under its real name (pyproject.toml [tool.mypy]).
	mkdir -p .typecheck && ln -sfn .. .typecheck/pollinate
	$(VENV)/bin/mypy

fix: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
