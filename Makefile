# perse-ray: every target sets up its own environment on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
ISOLATED := scripts/isolated
RUN := OMP_NUM_THREADS=1 $(ISOLATED)
OUT ?= out/demo
PRESET ?=

.PHONY: venv test demo bench serve clean

venv: $(STAMP)

# Reinstall only when pyproject.toml changed (the stamp carries its hash).
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25"
	$(PY) -m pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(RUN) $(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	@if [ -f jobs/build_avatars.py ]; then \
	  $(RUN) $(PY) jobs/build_avatars.py --input examples/portraits --output $(OUT) $(if $(PRESET),--preset $(PRESET)) && \
	  echo "report: $(OUT)/report/index.html"; \
	else \
	  echo "jobs/build_avatars.py is not built yet: running the stages that exist."; \
	  if [ -f jobs/synthesize.py ]; then \
	    $(RUN) $(PY) jobs/synthesize.py --input examples/portraits --output $(OUT)/synth $(if $(PRESET),--preset $(PRESET)); \
	  else echo "missing: jobs/synthesize.py (synthesis)"; fi; \
	  if [ -f benchmarks/gt_avatar.py ]; then \
	    $(RUN) $(PY) benchmarks/gt_avatar.py --preset cpu-smoke; \
	  else echo "missing: benchmarks/gt_avatar.py (avatar core)"; fi; \
	  for m in jobs/train.py serve/app.py jobs/build_avatars.py; do [ -f $$m ] || echo "missing: $$m"; done; \
	fi

bench: venv
	@for b in benchmarks/*.py; do \
	  echo "# $$b" >&2; $(RUN) $(PY) $$b --json $(BENCH_ARGS) || exit 1; \
	done

serve: venv
	PERSE_REGISTRY=$${PERSE_REGISTRY:-$(OUT)/avatars} $(ISOLATED) $(VENV)/bin/serve run serve/config.yaml

clean:
	rm -rf out .pytest_cache
