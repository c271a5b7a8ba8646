# mailgw — every set-up step a fresh Debian / Raspberry Pi OS machine needs.
#   make demo    bootstrap a venv, run the gateway end to end on this machine
#   make test    bootstrap, install Mosquitto if missing, lint, types, the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: help bootstrap test lint typecheck unit demo bench soak system-deps demo-deps clean

help:
	@echo "make demo | test | bench | soak | lint | typecheck | clean"

$(BIN)/.installed: pyproject.toml
	@# Debian splits venv/ensurepip into python3-venv; install it when missing.
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { \
	  rm -rf $(VENV); \
	  echo "bootstrap: python3-venv is missing; installing it with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

bootstrap: $(BIN)/.installed

# System packages the tests and the demo use, installed only when missing: a real
# MQTT broker (both), a C compiler for the firmware reference encoder (tests only).
demo-deps:
	@$(MAKE) --no-print-directory system-deps WANT_CC=

WANT_CC ?= yes
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -z "$(WANT_CC)" ] || command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "bootstrap: installing$$missing with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

lint: bootstrap
	$(BIN)/ruff check gateway firmware_bridge tests bench
	$(BIN)/ruff format --check gateway firmware_bridge tests bench

typecheck: bootstrap
	$(BIN)/mypy --strict gateway firmware_bridge

unit: bootstrap system-deps
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

soak: bootstrap system-deps
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

bench: bootstrap system-deps
	$(BIN)/python -m bench

demo: bootstrap demo-deps
	$(BIN)/mailgw demo

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
