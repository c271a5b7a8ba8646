# mailgw — every set-up step a fresh Debian / Raspberry Pi OS machine needs.
#   make demo    bootstrap a venv, run the gateway end to end on this machine
#   make test    bootstrap, install Mosquitto if missing, lint, types, the suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: help bootstrap test lint typecheck unit demo bench soak system-deps demo-deps clean \
	package package-deps test-system system-test-deps

help:
	@echo "make demo | test | test-system | package | bench | soak | lint | typecheck | clean"

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
# MQTT broker (both), a C compiler for the firmware reference encoder and iptables for
# the blackholed-smarthost test (tests only).
demo-deps:
	@$(MAKE) --no-print-directory system-deps WANT_CC=

WANT_CC ?= yes
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -z "$(WANT_CC)" ] || command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	[ -z "$(WANT_CC)" ] || [ -x /usr/sbin/iptables ] || missing="$$missing iptables"; \
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
	$(BIN)/pytest -q -rP -m slow $(PYTEST_ARGS)

bench: bootstrap system-deps
	$(BIN)/python -m bench

demo: bootstrap demo-deps
	$(BIN)/mailgw demo

# --- the Debian package ---------------------------------------------------------------
# One architecture-independent .deb (arm64, armhf, amd64; Debian 12 and 13): a wheelhouse
# of mailgw, its dependencies and pip, from which the postinst builds the virtualenv in
# /opt/mailgw with the device's own python3, offline.
DEB_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PKG := build/package

package-deps:
	@command -v dh >/dev/null && command -v dpkg-buildpackage >/dev/null || { \
	  echo "package: installing debhelper with apt-get"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends \
	    debhelper dpkg-dev; }

package: bootstrap package-deps
	rm -rf $(PKG) && mkdir -p $(PKG) dist
	$(BIN)/python -m pip wheel -q --wheel-dir $(PKG)/wheelhouse .
	@# pip itself, run from its wheel on the device; the one this venv has.
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --dest $(PKG)/wheelhouse \
	  "pip==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("pip"))')"
	@# Compiled code would tie the package to one architecture and one Python: refuse it.
	@if ls $(PKG)/wheelhouse | grep -Ev -- '-(py2\.)?py3-none-any\.whl$$'; then \
	  echo "package: the wheels above are not pure Python 3"; exit 1; fi
	cp -r deploy/debian $(PKG)/debian
	cp systemd/mailgw.service $(PKG)/debian/mailgw.service
	cp systemd/mailgw-firstboot.service $(PKG)/debian/mailgw.mailgw-firstboot.service
	cp deploy/sysusers-mailgw.conf $(PKG)/debian/mailgw.sysusers
	cp deploy/modules-load.d-mailgw.conf $(PKG)/debian/modules-load.conf
	mkdir -p $(PKG)/docs $(PKG)/firmware_bridge
	cp deploy/gateway.toml deploy/build-venv deploy/sendmail README.md $(PKG)/
	cp docs/*.md $(PKG)/docs/ && cp firmware_bridge/PROTOCOL.md $(PKG)/firmware_bridge/
	{ echo "mailgw ($(DEB_VERSION)) unstable; urgency=medium"; echo; \
	  echo "  * Built from git $$(git describe --always --dirty 2>/dev/null || echo unknown)."; \
	  echo; echo " -- mailgw developers <mailgw@example.org>  $$(date -R -d @$$(git log -1 \
	  --format=%ct 2>/dev/null || date +%s))"; } > $(PKG)/debian/changelog
	cd $(PKG) && dpkg-buildpackage -b -us -uc >build.log 2>&1 || { tail -30 build.log; exit 1; }
	mv build/mailgw_$(DEB_VERSION)_all.deb build/mailgw-sendmail_$(DEB_VERSION)_all.deb dist/
	@rm -f build/mailgw_$(DEB_VERSION)_*.buildinfo build/mailgw_$(DEB_VERSION)_*.changes
	@echo "package: dist/mailgw_$(DEB_VERSION)_all.deb dist/mailgw-sendmail_$(DEB_VERSION)_all.deb"

# --- the package under a real systemd (tests/system) ---------------------------------
# Installs the .deb into Debian 12 and 13 chroots (install, upgrade, purge, a Python
# change under it), boots both with systemd as PID 1 in systemd-nspawn, and installs and
# runs it in arm64 and armhf roots under qemu-user-static. The debootstrap roots are
# cached in /var/cache/mailgw-system (built when missing: about 70 s each for amd64,
# 4-8 min for the emulated arm ones).
system-test-deps:
	@[ "$$(id -u)" = 0 ] || { echo "make test-system: run it as root (chroot, systemd-nspawn)"; exit 2; }
	@missing=""; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || missing="$$missing qemu-user-static binfmt-support"; \
	if [ -n "$$missing" ]; then \
	  echo "test-system: installing$$missing with apt-get"; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# Without systemd as PID 1 nothing registers the emulators at boot: do it here.
	@[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable >/dev/null

test-system: bootstrap system-deps system-test-deps package
	$(BIN)/pytest -q -m system tests/system $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
