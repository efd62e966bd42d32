# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SYSTEM_PACKAGES := libenchant-2-2 hunspell-en-us default-jre-headless chromium
DEMO_DIR ?= demo-data
DEMO_ARGS ?=

.PHONY: setup system-packages demo test lint bench clean

# PyEnchant needs libenchant and an en_US dictionary; METEOR and the PTB tokenizer need Java;
# the report's test renders report.html in a headless Chromium.
system-packages:
	@missing=""; \
	for p in libenchant-2-2 hunspell-en-us; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(BIN)/csmn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: system-packages $(BIN)/csmn

# A local Ray head, the pipeline submitted to it as one job, the head stopped at the end.
demo: setup
	$(BIN)/csmn demo --out $(DEMO_DIR) $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check csmn jobs tests bench

# Benchmarks print ratios measured in one run; they are not tests. Minutes each on 2 cores.
bench: setup
	for b in synth preprocess features model train generate; do $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(DEMO_DIR) $(VENV)
