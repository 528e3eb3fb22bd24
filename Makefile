# Quick start on a fresh machine:  `make demo`  and  `make test`.
# Both create (or reuse) a local virtualenv in .venv with pip.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test demo bench clean-venv

# torch's x86_64 build is a CUDA build of about 5.5 GB in the venv; pip keeps no wheel cache here.
NEED_GB ?= 7
PIP    := $(PY) -m pip install -q --no-cache-dir

$(VENV)/.installed: pyproject.toml
	@d="$(dir $(abspath $(VENV)))"; [ -d "$$d" ] || d=.; \
	free=$$(df -Pk "$$d" | awk 'NR==2 {print int($$4/1048576)}'); \
	if [ "$$free" -lt $(NEED_GB) ]; then \
	  echo "make: the virtualenv needs about $(NEED_GB) GB of free disk (torch's CUDA build is 5.5 GB)."; \
	  echo "  free here: $$free GB"; \
	  echo "  Free space, or point VENV at another disk: make test VENV=/other/disk/venv"; \
	  exit 1; fi
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e '.[all]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(PY) examples/two_spirals.py --out out/two_spirals

clean-venv:
	rm -rf $(VENV)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench.py
