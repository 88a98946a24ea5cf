# Two commands set up a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: venv demo test test-all bench clean

# the viewer's OpenSeadragon + Annotorious, built into a git-ignored folder the server serves (README "Viewer")
WEB_BUILT := src/hwsi/serve/static/vendor/built.json

venv: $(VENV)/.installed $(WEB_BUILT)

# npm ci installs web/package-lock.json exactly; web/build.mjs copies their prebuilt bundles where the server serves.
# Without npm only the front end is missing: a warning here, the page answers 503 and the browser test skips.
$(WEB_BUILT): web/package.json web/package-lock.json web/build.mjs
	@if command -v npm >/dev/null; then \
	  cd web && npm ci --no-audit --no-fund --loglevel=error && node build.mjs; \
	else \
	  echo "warning: npm not found: the viewer's front end is not built (needs node >= 18 and npm: apt-get install nodejs npm, then make venv)"; \
	fi

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
