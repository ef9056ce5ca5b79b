# `make demo`: set up and run the whole job on generated data. `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := runs/demo-data/tiny-imagenet-synth.zip
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean venv

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@# tcmalloc: TensorFlow on CPU runs ~3x faster with it (see job/allocator.py); best effort, root + apt only.
	@if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing libtcmalloc-minimal4"; \
	  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q libtcmalloc-minimal4 >/dev/null) || \
	  echo "Could not install tcmalloc: training on CPU will be slower"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Generated once: a regenerated zip is other data to the run (its mtime changes), and synth does not replace it.
$(DEMO_DATA): | $(STAMP)
	$(PY) -m job synth --output $(DEMO_DATA) --classes 10 --per-class 100 --downstream-per-class 100 --val-per-class 50

demo: $(STAMP) $(DEMO_DATA)
	$(PY) -m job run --data $(DEMO_DATA) --output runs/demo --config demo
	@echo "Open runs/demo/report/report.md; watch with: $(VENV)/bin/tensorboard --logdir runs/demo/logs"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs/demo runs/demo-data
