"""The one check of a refused command: exit 2, one `error:` line, nothing written."""

import hashlib
import os
import re

import models
from data import SAMPLES_DIR

# a two-step run on the tiny OPT that saves a checkpoint every step: the runs refusals damage;
# SHORT_RUN is MeZO's (uncompiled: no compile time), SHORT_FO_RUN the backprop trainer's, which
# refuses a zeroth-order flag such as --perturbation
SHORT_FO_RUN = (
    "--num_train 16 --num_dev 8 --num_eval 4 --batch_size 4"
    " --max_steps 2 --eval_steps 2 --save_steps 1 --logging_steps 1"
    " --learning_rate 1e-3"
).split()
SHORT_RUN = ["--perturbation", "eager", *SHORT_FO_RUN]
# folders every command reads: they must never change
READ = [os.path.dirname(models.TINY_OPT), SAMPLES_DIR]


def folder_hash(*roots) -> str:
    """Every path under roots (a root may be a file): its name, mode, mtime and bytes, or a
    symlink's target."""
    h = hashlib.sha256()
    for root in map(str, roots):
        paths = (
            [
                os.path.join(folder, name)
                for folder, dirs, names in sorted(os.walk(root))
                for name in sorted(dirs + names)
            ]
            if os.path.isdir(root)
            else [root]
        )
        for path in paths:
            if not os.path.lexists(path):
                continue
            st = os.lstat(path)
            h.update(f"{path}:{st.st_mode}:{st.st_mtime_ns}".encode())
            if os.path.islink(path):
                h.update(os.readlink(path).encode())
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def exit_status(main, argv) -> int:
    """main(argv)'s exit status, whether it returns it or raises SystemExit (argparse)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(code, err, what="") -> str:
    """A refusal's output: exit 2, one line `error: <what> (<where>)` holding `what`, no
    traceback. -> the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and what in lines[-1], err
    assert re.search(r" \(.+\)$", lines[-1]), f"no (<where>) in {lines[-1]!r}"
    assert sum("error:" in line for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


def refused(capsys, main, argv, what, *roots):
    """main(argv) exits 2 with one `error:` line holding `what` and no traceback; everything under
    roots and READ is unchanged. -> the error line."""
    assert all(os.path.lexists(root) for root in roots), roots  # something to protect
    before = folder_hash(*roots, *READ)
    code = exit_status(main, argv)
    line = one_error_line(code, capsys.readouterr().err, what)
    assert folder_hash(*roots, *READ) == before, "something was written"
    return line
