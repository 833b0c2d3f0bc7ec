# make test — set up .venv (CPU torch wheel if no torch is importable) and run the CPU test suite
# make demo — a smoke run of the toy model (later: sample the shipped toy model)
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup test demo clean

$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PYTHON) -m pytest tests

demo: $(VENV)/.installed
	$(PYTHON) model.py

clean:
	rm -rf $(VENV) .pytest_cache
