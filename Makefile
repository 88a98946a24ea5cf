# Two commands set up a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: venv demo test test-all bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup-system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) -e '.[test,deepspeed]'  # deepspeed: tests/test_train_deepspeed.py
	bash scripts/setup-system.sh $(VENV)
	touch $@

demo: venv
	$(VENV)/bin/hwsi demo --out demo_out

test: venv
	$(VENV)/bin/pytest -q

test-all: venv
	$(VENV)/bin/pytest -q -m ''

bench: venv
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out .pytest_cache
