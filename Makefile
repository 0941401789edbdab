# Set-up is part of every target: a fresh machine needs only Python 3.10+ and make.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The demo's data: the offline copy beside the checkout, else the Hub.
DATASET ?= $(if $(wildcard ../shared/data/cifar10),../shared/data/cifar10,uoft-cs/cifar10)
DEMO_DIR ?= runs/demo
# accelerate launch trains on one thread unless told otherwise; the demo uses every core.
THREADS ?= $(shell python3 -c 'import os; print(os.cpu_count() or 1)')

.PHONY: demo test

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

# A few minutes of self-distillation on CIFAR-10 at 32x32 (CPU), thresholds certified on validation (at most
# 2 points lost with probability 0.9), then test accuracy per exit, the early-exit speed-up (MACs and
# wall-clock) and whether the promise held, with the installed commands.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(THREADS) \
		--mixed_precision no --dynamo_backend no \
		-m timm_scan train --dataset $(DATASET) --output-dir $(DEMO_DIR) --model resnet18 \
		--input-size 32 --crop-pct 1.0 --train-scale 0.35 1 --max-train-samples 23000 --val-size 5000 \
		--epochs 4 --batch-size 64 --lr 0.05
	$(VENV)/bin/timm-scan search $(DEMO_DIR) --max-drop 2 --confidence 0.9 --min-threshold 0.5
	$(VENV)/bin/timm-scan evaluate $(DEMO_DIR)

test: $(STAMP)
	$(PYTHON) -m pytest
