# Two entry points, each works on a fresh machine by itself:
#   make run [ARGS="..."]   install (first time) and chat with the bundled demo model, or ARGS
#   make test               install (first time) and run the test suite
VENV ?= .venv
ARGS ?=

.PHONY: run test install lint

$(VENV)/.installed: pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV) --dev
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/moelocal chat $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check moelocal tests scripts
