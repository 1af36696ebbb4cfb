"""The program around the method: everything train.py and eval.py do that is not the method
(zo/), a model (models/) or a task (data/). The run configuration (config.py) and the command
line derived from it (flags.py), the run (run.py) and the loop's components (loop.py), run
folders, checkpoints, trajectory files and the folder lock on disk, progress lines, replay, the
data commands, and reproducing the paper (paper/).

It is the top layer: it imports zo/, models/ and data/, and none of them imports it
(tests/test_layers.py). It runs from the checkout and is not installed into site-packages.
"""
