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
# always with pip: monailabel's wheel names its data folder monailabel-0.8.5-202411252313.data, which uv 0.13.9
# copies into site-packages instead of installing its `monailabel` command into .venv/bin (pip installs it)
LABEL_COMPAT := apps/monailabel/compat/robustmri_pydicom3_compat
# ONNX Runtime: the CPU wheel by default; `make demo ORT=gpu` puts onnxruntime-gpu in its place (both
# wheels provide the one `onnxruntime` module, so it replaces the CPU one; docs/deployment.md says why
# the CPU wheel is the default). Its CUDA and cuDNN libraries are the ones torch's wheels install.
ORT ?= cpu
ORT_GPU := onnxruntime-gpu==1.31.1
# The installer: uv (pinned, bootstrapped into the venv with pip) installs the same pinned set as pip in about
# 60 % of the time on 2 cores (docs/results.md, "How long does set-up take?"); `make INSTALLER=pip` uses pip alone.
INSTALLER ?= uv
UV := uv==0.13.9
ifeq ($(INSTALLER),uv)
INSTALL = $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode --index-strategy unsafe-best-match \
	$$($(PY) -m pip config list 2>/dev/null | $(PY) -c "$$PIP_SOURCES_PY")
UNINSTALL = $(VENV)/bin/uv pip uninstall --python $(PY)
else
INSTALL = $(VENV)/bin/python -m pip install
UNINSTALL = $(VENV)/bin/python -m pip uninstall -y
endif
# uv reads no pip configuration: it is handed the index, extra indexes, find-links and constraints that pip is
# configured with (`pip config list`: pip's files and PIP_* variables), so both install from the same places;
# unsafe-best-match picks versions across indexes as pip does
define PIP_SOURCES_PY
import ast, sys
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    option = key.split(".", 1)[-1]
    if option in ("index-url", "extra-index-url", "find-links", "constraint"):
        print(" ".join(f"--{option} {v}" for v in ast.literal_eval(value).split()))
endef
export PIP_SOURCES_PY
BUNDLE_RUN := cd bundle && $(PY) -m monai.bundle run
DEMO_CONFIGS := "['configs/train.json','configs/quick.json']"

.PHONY: demo test test-fast clean

$(VENV)/.installed: pyproject.toml $(LABEL_COMPAT).py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(VENV)/bin/python -m pip install $(UV)
endif
	$(INSTALL) -e '.[$(EXTRAS)]'
ifeq ($(ORT),gpu)
	$(UNINSTALL) onnxruntime
	$(INSTALL) $(ORT_GPU)
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
