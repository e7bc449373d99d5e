# maedet: every entry point a user needs. See README.md.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TOY := datasets/toy
QS := output/quickstart

.PHONY: install lint test quickstart toy-data clean help

help:
	@echo "make quickstart   install, then run the whole pipeline on the built-in toy data (CPU, a few minutes)"
	@echo "make test         install, then run the linters (ruff) and the test suite"
	@echo "make install      install maedet and its pinned dependencies (constraints.txt)"

# The stamp re-runs the install whenever the pins or the package metadata change.
.installed: constraints.txt pyproject.toml
	$(PIP) install -c constraints.txt -e ".[dev]"
	@touch $@

install: .installed

$(TOY)/annotations/instances_val.json:
	$(PYTHON) datasets/prepare_toy.py --output $(TOY)

toy-data: .installed $(TOY)/annotations/instances_val.json

quickstart: toy-data
	$(PYTHON) tools/pretrain.py --config configs/quickstart/mae_tiny.yaml --output-dir $(QS)/mae --overwrite
	$(PYTHON) tools/train_net.py --config configs/quickstart/mask_rcnn_vit_tiny.yaml --output-dir $(QS)/det \
		--overwrite model.backbone.pretrained=$(QS)/mae/encoder_final.pth
	$(PYTHON) tools/train_net.py --config configs/quickstart/mask_rcnn_vit_tiny.yaml --output-dir $(QS)/det \
		--eval-only model.weights=$(QS)/det/model_final.pth
	$(PYTHON) tools/infer.py --config configs/quickstart/mask_rcnn_vit_tiny.yaml \
		--weights $(QS)/det/model_final.pth --input $(TOY)/val --output $(QS)/pictures \
		--json $(QS)/pictures/results.json --score-thresh 0.5
	@echo "quickstart done: pictures in $(QS)/pictures, AP table above (also $(QS)/det/eval/), logs in $(QS)/"

lint: .installed
	$(PYTHON) -m ruff check maedet tools tests datasets
	$(PYTHON) -m ruff format --check maedet tools tests datasets

test: lint
	$(PYTHON) -m pytest -q

clean:
	rm -rf output .installed
