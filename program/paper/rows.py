"""The runs behind RESULTS.md, the one place to change them: the data and run flags every row
shares, Table 1's rows (ROWS), the grid behind their learning rates (GRID), the estimators side by
side (ESTIMATOR_ROWS), directions per step side by side (DIRECTION_ROWS) and `make results-gpu`'s
step counts (GPU_STEPS). program/paper/results.py
runs them.
"""

MODEL, DATA = ".cache/smollm2-135m-instruct", ".cache/rotten-tomatoes"
# The paper's protocol (mezo.sh: 1000 train, 500 dev; 1000 test, here 500: 0.2 points per example).
DATA_FLAGS = {
    "task": "SST2",
    "num_train": 1000,
    "num_dev": 500,
    "num_eval": 500,
    "train_set_seed": 0,
}
# ZO/optimizer seeds of the trained rows; the data (train, dev, test rows) is the same for every
# row.
SEEDS = (0, 1, 2)
TRAIN_FLAGS = {
    "max_length": 128,
    "eval_batch_size": 16,
    "logging_steps": 10,
    "eval_final_step": True,
}
# One row per line: eval.py flags (kind "eval") or train.py flags. Budget (README "make results"):
# the whole table in 90 minutes on 2 idle cores. Every MeZO row at batch 16: batch 8 doubles the
# variance of each step's estimate, and LoRA and prefix at batch 8 diverged or flattened at their
# upper learning rates within 100 steps (RESULTS.md, run 2026-12-06). Learning rates: GRID's best on
# dev. 16 demonstrations: the paper's 32 fit SmolLM2's 8192 positions but double the cost (the
# timings behind these: BENCHMARKS.md, "make demo and make results"). The MeZO rows name the
# paired step (the default) so that their folders' hash does not move with a default.
ROWS = {
    "zero-shot": {"kind": "eval", "num_train": 0},
    "icl": {"kind": "eval", "num_train": 16},
    "mezo": {
        "trainer": "zo",
        "mode": "ft",
        "batch_size": 16,
        "learning_rate": 1e-4,
        "zo_eps": 1e-3,
        "perturbation": "paired",
        "max_steps": 100,
        "eval_steps": 50,
    },
    "mezo-lora": {
        "trainer": "zo",
        "mode": "lora",
        "batch_size": 16,
        "learning_rate": 3e-3,
        "zo_eps": 1e-2,
        "perturbation": "paired",
        "max_steps": 100,
        "eval_steps": 50,
    },
    "mezo-prefix": {
        "trainer": "zo",
        "mode": "prefix",
        "batch_size": 16,
        "learning_rate": 3e-2,
        "zo_eps": 1e-1,
        "perturbation": "paired",
        "max_steps": 100,
        "eval_steps": 50,
    },
    "ft": {
        "trainer": "fo",
        "mode": "ft",
        "batch_size": 16,
        "learning_rate": 3e-5,
        "max_steps": 40,
        "eval_steps": 20,
    },
    "ft-lora": {
        "trainer": "fo",
        "mode": "lora",
        "batch_size": 16,
        "learning_rate": 5e-4,
        "max_steps": 40,
        "eval_steps": 20,
    },
}
# The grid on dev behind ROWS' learning rates (`--grid`): each point is a row's seed-0 run at its
# full length, so the point ROWS keeps is also that row's first run. eps is the paper's per mode (ft
# 1e-3, LoRA 1e-2, prefix 1e-1), not varied: the paper's grids fix it too, and each point costs a
# run.
GRID = {
    "mezo": {"learning_rate": (1e-5, 3e-5, 1e-4, 3e-4)},
    "mezo-lora": {"learning_rate": (1.5e-3, 3e-3)},
    "mezo-prefix": {"learning_rate": (1e-2, 3e-2)},
    "ft": {"learning_rate": (1e-5, 3e-5)},
    "ft-lora": {"learning_rate": (1e-4, 5e-4)},
}
# The estimators side by side (FZOO, Sparse-MeZO; README "Estimators") at 240 forward passes,
# evaluated about every 80: MeZO's arm is MeZO-LoRA at batch 16, lr 3e-3.
# Learning rates match the z noise an update adds (no grid): FZOO's normalised estimate sum_i g_i
# z_i has norm ~ sqrt(d / N), MeZO's g z ~ |g| sqrt(d), |g| rms 1.6 in the MeZO-LoRA runs
# (BENCHMARKS.md); equal noise per forward pass gives lr_fzoo = lr |g| sqrt(N (N + 1) / 2) ~ 3e-2,
# taken at 2e-2. Sparse-MeZO perturbs a quarter of the weights, so lr / sqrt(1 - 0.75) = 6e-3 adds
# MeZO's noise per step.
_MEZO_LORA_BS16 = {
    "trainer": "zo",
    "mode": "lora",
    "batch_size": 16,
    "learning_rate": 3e-3,
    "zo_eps": 1e-2,
    "max_steps": 120,
    "eval_steps": 40,
}
ESTIMATOR_ROWS = {
    "mezo-lora": _MEZO_LORA_BS16,
    "fzoo-lora": {
        **_MEZO_LORA_BS16,
        "estimator": "fzoo",
        "fzoo_n": 8,
        "learning_rate": 2e-2,
        "max_steps": 27,
        "eval_steps": 9,
    },
    "sparse-mezo-lora": {**_MEZO_LORA_BS16, "sparse_mezo": 0.75, "learning_rate": 6e-3},
}
# `make results-gpu`: ROWS at the paper's step counts scaled to about 8 minutes on one H100, as
# (max_steps, eval_steps) per trainer: MeZO 1000 steps, 1/20 of the paper's 20000, checked every
# 250 (the paper's 1/5); backprop the paper's 625 (5 epochs of 1000 examples at batch 8), checked
# every 125 (per epoch). The 8 minutes are an estimate (9 MeZO runs at about 40 ms a step, 6
# backprop runs, the two evaluations), not yet measured: no GPU has run it.
GPU_STEPS = {"zo": (1000, 250), "fo": (625, 125)}
# Directions per step (`make results-directions`): MeZO-LoRA at batch 16 with N = 1, 2, 4 and 8
# directions a step (n-SPSA: each estimate divided by N; `--parallel directions` spreads the same
# arithmetic over ranks), every N at the same steps and learning rate, so the table reads them at
# equal steps and, through their forward passes, at equal forward passes. 40 steps, dev every 10:
# the N = 8 row alone is 640 forward passes. The perturbation is named (paired, the default) so
# that the folders' hash does not move with a default.
DIRECTION_ROWS = {
    ("mezo-lora" if n == 1 else f"mezo-lora-nspsa{n}"): {
        **_MEZO_LORA_BS16,
        "n_spsa": n,
        "perturbation": "paired",
        "max_steps": 40,
        "eval_steps": 10,
    }
    for n in (1, 2, 4, 8)
}
