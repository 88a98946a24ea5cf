# Two commands set up a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: venv demo test test-all bench clean

WEB_BUILT := src/hwsi/serve/static/vendor/.built  # the viewer's OpenSeadragon + Annotorious (git-ignored)

venv: $(VENV)/.installed $(WEB_BUILT)

# npm ci installs web/package-lock.json exactly; web/build.mjs copies their prebuilt bundles where the server serves
$(WEB_BUILT): web/package.json web/package-lock.json web/build.mjs
	@command -v npm >/dev/null || { echo "npm not found: the viewer needs node >= 20 and npm (apt-get install nodejs npm)"; exit 1; }
	cd web && npm ci --no-audit --no-fund --loglevel=error && node build.mjs

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
	rm -rf demo_out .pytest_cache web/node_modules src/hwsi/serve/static/vendor
