# perse-ray: every target sets up its own environment on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
NODE_STAMP := node_modules/.installed-$(shell sha256sum package-lock.json | cut -c1-16)
ISOLATED := scripts/isolated
RUN := OMP_NUM_THREADS=1 $(ISOLATED)
OUT ?= out/demo
PRESET ?=

.PHONY: venv node test demo bench serve clean

venv: $(STAMP)

# The viewer's splat renderer (served by the ingress from node_modules) and the .ply readers the
# tests use, exactly as package-lock.json pins them; reinstalled only when the lock file changed.
node: $(NODE_STAMP)

$(NODE_STAMP): package.json package-lock.json
	@command -v npm >/dev/null || { echo "needs npm (apt-get install nodejs npm)"; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts
	@rm -f node_modules/.installed-*
	@touch $@

# Reinstall only when pyproject.toml changed (the stamp carries its hash).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv node
	$(RUN) $(PY) -m pytest $(PYTEST_ARGS)

# build_avatars prints the report path and the `serve run` line for its output.
demo: venv
	$(RUN) $(PY) jobs/build_avatars.py --input examples/portraits --output $(OUT) $(if $(PRESET),--preset $(PRESET))
	@echo "or: make serve OUT=$(OUT)"

# Every benchmark (benchmarks/*.py but the _*.py helpers) with --json $(BENCH_ARGS), e.g.
# BENCH_ARGS=--quick (about a minute each). stdout must be JSON lines {figure, value, unit, config}
# (benchmarks/_check_output.py checks it). All run; the target fails at the end if any failed.
# BENCH=benchmarks/serve_load.py runs one.
BENCH ?= $(filter-out benchmarks/_%,$(sort $(wildcard benchmarks/*.py)))
bench: venv node
	@set -o pipefail; failed=""; all=$$(date +%s); \
	for b in $(BENCH); do \
	  echo "# $$b --json $(BENCH_ARGS)" >&2; t=$$(date +%s); \
	  if $(RUN) $(PY) $$b --json $(BENCH_ARGS) | $(PY) benchmarks/_check_output.py $$b; then \
	    echo "# $$b: ok, $$(( $$(date +%s) - t )) s" >&2; \
	  else \
	    echo "# $$b: FAILED, $$(( $$(date +%s) - t )) s" >&2; failed="$$failed $$b"; \
	  fi; \
	done; \
	echo "# bench: $$(( $$(date +%s) - all )) s" >&2; \
	if [ -n "$$failed" ]; then echo "bench: failed:$$failed" >&2; exit 1; fi

serve: venv node
	@echo "serve: $$(grep -E '^\s+auth:' serve/config.yaml | head -1 | xargs)$${PERSE_KEYS_FILE:+ (keys file $$PERSE_KEYS_FILE)} (serve/config.yaml)"
	PERSE_REGISTRY=$${PERSE_REGISTRY:-$(OUT)/avatars} $(ISOLATED) $(VENV)/bin/serve run serve/config.yaml

clean:
	rm -rf out .pytest_cache
