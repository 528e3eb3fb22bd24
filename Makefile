# Quick start on a fresh machine:  `make demo`  and  `make test`.
# Both create (or reuse) a local virtualenv in .venv with pip.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test demo bench clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[all]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(PY) examples/two_spirals.py --out out/two_spirals

clean-venv:
	rm -rf $(VENV)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py
