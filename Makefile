# Every target sets itself up on a fresh machine: a virtual environment in .venv with
# torch 2.13.0 (the CPU build where that is what pip finds) and exact pins from constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench grid clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests

# MeZO vs backprop on the embedded tiny OPT and the bundled SST-2 sample (README: "The demo").
DEMO := --task SST2 --learning_rate 1e-3 --logging_steps 50 --overwrite_output_dir
demo: $(STAMP)
	$(PY) train.py $(DEMO) --trainer zo --max_steps 1000 --eval_steps 100 --output_dir runs/demo-zo
	$(PY) train.py $(DEMO) --trainer fo --max_steps 100 --eval_steps 10 --output_dir runs/demo-fo
	$(PY) eval.py compare runs/demo-zo runs/demo-fo
	@echo "(229K parameters: torch and the compiled kernels dominate peak memory; make bench compares at OPT-125m scale)"

bench: $(STAMP)
	$(PY) tests/bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results.json

# The paper's grid for one cell, e.g. `make grid TASK=SST2 MODE=ft MODEL=facebook/opt-13b`;
# finished points are skipped, the best by the original's rule is printed. EXTRA adds flags.
FAMILY ?= opt
TASK   ?= SST2
MODE   ?= ft
MODEL  ?= facebook/opt-13b
OUT    ?= runs/grid
grid: $(STAMP)
	$(PY) train.py --preset $(FAMILY)-mezo-$(MODE) --grid --task $(TASK) --model $(MODEL) --output_dir $(OUT) $(EXTRA)
