# Quick start: `make demo` trains, evaluates and predicts on built-in synthetic data; `make test` runs the tests.
PYTHON ?= python3
DEMO_RUN := checkpoints/demo

.PHONY: install install-dev demo test

install:
	$(PYTHON) -m pip install -q -r requirements.txt

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt

demo: install
	$(PYTHON) train.py --dataset shapes --image-size 64 --num-train 2000 --num-val 200 --epochs 10 \
		--batch-size 16 --lr 3e-3 --base-channels 16 --depth 3 --name demo
	$(PYTHON) eval.py --json samples/demo_scores.json
	$(PYTHON) datasets.py --out samples --count 2 --image-size 64
	$(PYTHON) predict.py -i samples/shapes_0.png samples/shapes_1.png

test: install-dev
	$(PYTHON) -m pytest -q tests
