# Quick start: `make demo` trains, evaluates and predicts on built-in synthetic data; `make test` runs the tests.
PYTHON ?= python3
DEMO_RUN := checkpoints/demo
# train.py writes each run to <checkpoint-dir>/<name>-<timestamp>/: the demo's checkpoint is the newest one there.
DEMO_MODEL = "$$(ls -td $(DEMO_RUN)/*/ | head -1)best.pth"

.PHONY: install install-dev demo test

install:
	$(PYTHON) -m pip install -q -r requirements.txt

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt

demo: install
	$(PYTHON) train.py --dataset shapes --image-size 64 --num-train 2000 --num-val 200 --time 1m \
		--lr 3e-3 --base-channels 16 --depth 3 --name demo --checkpoint-dir $(DEMO_RUN)
	$(PYTHON) eval.py -m $(DEMO_MODEL) --dataset shapes --split val --json samples/demo_scores.json
	$(PYTHON) synthetic.py --out samples --count 2 --image-size 64
	$(PYTHON) predict.py -m $(DEMO_MODEL) -i samples/images -o samples --overlay

test: install-dev
	$(PYTHON) -m pytest -q tests
