# Two commands set everything up on a fresh machine:
#   make demo   create .venv if missing, train with ISP on the embedded synthetic set, evaluate on its test split
#   make test   create .venv if missing, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
BUNDLE_RUN := cd bundle && $(PY) -m monai.bundle run
DEMO_CONFIGS := "['configs/isp.json','configs/quick.json']"

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BUNDLE_RUN) training --config_file $(DEMO_CONFIGS)
	$(BUNDLE_RUN) evaluating --config_file "['configs/train.json','configs/quick.json','configs/evaluate.json']"
	@echo "checkpoints in bundle/models; curves, influence scores and pictures, test metrics in bundle/eval"

test: $(VENV)/.installed
	$(PY) -m pytest

clean:
	rm -rf $(VENV) bundle/eval bundle/models/*.pt
