# Everything a fresh machine needs: `make serve` runs the server, `make test` runs the suite.
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per layer: `make test` after `make serve` only adds the dev extra.
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev serve test clean chromium prometheus llama-converter

install: $(RUNTIME_STAMP)

install-dev: $(DEV_STAMP)

# deploy/install.sh holds the pip steps (torch==2.13.0, the SmolLM2 model, kvserve); the Dockerfile runs it too.
$(RUNTIME_STAMP): pyproject.toml deploy/install.sh
	python3 -m venv $(VENV)
	sh deploy/install.sh $(PY) -e .
	touch $@

# The test tools (pytest, triton, playwright, the deploy linters) and the bench extra.
$(DEV_STAMP): $(RUNTIME_STAMP)
	sh deploy/install.sh $(PY) -e '.[dev]'
	touch $@

# llama.cpp's own Hugging Face -> GGUF converter, for tests/model/test_gguf_families.py: the converter, its
# conversion/ modules and its gguf-py, unpacked from the llama-cpp-python sdist on PyPI (nothing is built);
# and the real chat templates llama.cpp keeps (models/templates), for tests/model/test_chat_templates.py.
LLAMA_CPP_PYTHON := 0.3.36
# The stamp, not the converter: a venv unpacked before the chat templates were added unpacks again.
LLAMA_CPP_FILES := $(VENV)/llama.cpp/.unpacked-converter-templates
llama-converter: $(LLAMA_CPP_FILES)

$(LLAMA_CPP_FILES): $(DEV_STAMP)
	rm -rf $(VENV)/llama.cpp $(VENV)/llama.cpp.download
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/llama.cpp.download
	mkdir -p $(VENV)/llama.cpp
	tar xzf $(VENV)/llama.cpp.download/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/llama.cpp \
		--strip-components=3 $(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py models/templates)
	rm -rf $(VENV)/llama.cpp.download
	touch $@

serve: install
	$(VENV)/bin/kvserve serve

# Sleeping (not spinning) OpenMP workers: the tests run servers and clients side by side on few cores.
test: install-dev llama-converter chromium prometheus
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q --durations=15

# The playground's browser test drives Debian's Chromium through Playwright (no `playwright install`).
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium chromium-driver)

# tests/metrics run promtool and a real Prometheus server from Debian's package (started by the tests).
prometheus:
	command -v promtool >/dev/null || (apt-get update && apt-get install -y prometheus)

clean:
	rm -rf $(VENV)
