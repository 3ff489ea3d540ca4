# Two commands set everything up on a fresh machine:
#   make demo   create .venv if missing, train (naive training, the product's default) on the embedded synthetic set, evaluate on its test split
#   make test   create .venv if missing, run the test suite
# and, while changing code: make test-fast   the unit tests only (no `slow` or `monailabel` test), under 2 minutes
PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
# extras installed by `make`: tests, the MONAI Label app, `--tracking mlflow`
EXTRAS := dev,label,tracking
# MONAI Label (the [label] extra, apps/monailabel): these two are installed without their declared
# dependencies, which ask for numpy<2 and jsonschema<4 (see pyproject.toml); the compat hook lets
# pydicom-seg import under pydicom 3 (apps/monailabel/README.md)
LABEL_NO_DEPS := monailabel==0.8.5 pydicom-seg==0.4.1
LABEL_COMPAT := apps/monailabel/compat/robustmri_pydicom3_compat
# ONNX Runtime: the CPU wheel by default; `make demo ORT=gpu` puts onnxruntime-gpu in its place (both
# wheels provide the one `onnxruntime` module, so it replaces the CPU one; README "Deployment" says why
# the CPU wheel is the default). Its CUDA and cuDNN libraries are the ones torch's wheels install.
ORT ?= cpu
ORT_GPU := onnxruntime-gpu==1.31.1
BUNDLE_RUN := cd bundle && $(PY) -m monai.bundle run
DEMO_CONFIGS := "['configs/train.json','configs/quick.json']"

.PHONY: demo test test-fast clean

$(VENV)/.installed: pyproject.toml $(LABEL_COMPAT).py robustmri/engine/robustmri_base_configs.pth
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[$(EXTRAS)]'
ifeq ($(ORT),gpu)
	$(VENV)/bin/python -m pip uninstall -y onnxruntime
	$(VENV)/bin/python -m pip install $(ORT_GPU)
endif
	$(VENV)/bin/python -m pip install --no-deps $(LABEL_NO_DEPS)
	cp $(LABEL_COMPAT).py $(LABEL_COMPAT).pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	touch $@

demo: $(VENV)/.installed
	$(BUNDLE_RUN) training --config_file $(DEMO_CONFIGS)
	$(BUNDLE_RUN) evaluating --config_file "['configs/train.json','configs/quick.json','configs/evaluate.json']"
	@echo "checkpoints in bundle/models; training curves, test metrics and pictures in bundle/eval"

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not monailabel"

clean:
	rm -rf $(VENV) bundle/eval bundle/models/*.pt
