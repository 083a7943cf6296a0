# Two commands from a fresh clone:  `make demo` (the main job on the embedded default) and `make test`.
# Both create/reuse .venv and install what they need. On a CPU machine torch comes from the CPU wheel
# (torch==2.13.0, torchvision==0.28.0); on a GPU machine pass your CUDA build, for example
#   make test TORCH_INSTALL="torch torchvision --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_INSTALL ?= torch==2.13.0 torchvision==0.28.0
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-slow bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_INSTALL)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[demo,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) pipeline.py demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(PY) bench/sweep_speed.py

clean-venv:
	rm -rf $(VENV)
