"""Reproducing the paper: its configurations (presets), its numbers, the grid runner and SLURM
scripts, and the report that sets our results beside the paper's tables."""
