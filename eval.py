"""Evaluation: zero-shot, in-context learning and saved models; `eval.py report` for paper tables.

    python eval.py --task SST2 --model facebook/opt-13b --num_train 0      # zero-shot row python
    eval.py --task SST2 --model facebook/opt-13b --num_train 32     # ICL row (icl.sh) python
    eval.py --task SST2 --model runs/x/model                        # a saved fine-tuned model
    python eval.py --task SST2 --model facebook/opt-13b --adapter runs/x/model.adapter.safetensors
    python eval.py report runs/* --plot --out report/                      # Tables 1, 18, 22 python
    eval.py compare runs/demo/zero-shot runs/demo/mezo --plot c.png # runs side by side

Scoring is the original's (run.py `Framework.one_step_pred`, batched; data/evaluate.py). ICL draws
one demonstration set per test example, as the original does with no train_set_seed.
"""

import json
import os
import sys
import time

import torch

import data
import models
from data.evaluate import DTYPES, evaluate
from program import flags
from program.config import CHECKS
from program.folder_lock import FolderLock
from program.json_files import write_json
from program.paper import plots, report
from program.paper.runs import files_read, load_finished, load_runs
from program.progress import peak_memory
from program.run_folder import check_run_folder, prepare_run_folder
from zo.part import at_least

# eval.py's flags and their ranges (those train.py shares are RunConfig's), checked before the
# model is read
RULES = {
    "num_train": at_least(0),
    "max_new_tokens": at_least(1),
    **{
        name: CHECKS[name]
        for name in ("num_eval", "k", "train_set_seed", "batch_size", "max_length")
    },
}


def load(model_path, adapter=None, dtype="fp32", device="cpu"):
    """A model (+ adapter file written by train.py) and its tokenizer."""
    model = models.load_model(model_path, dtype=DTYPES[dtype], device=device)
    if adapter:
        models.apply_adapter(model, adapter)  # refuses another base than the adapter's
    tok = models.load_tokenizer(model_path)
    models.check_tokenizer(model, tok, models.resolve_model_path(model_path))
    return model, tok


def compare_main(argv):
    """`eval.py compare RUN_DIR... [--plot PNG]`: finished runs side by side
    (program/paper/report.py), the test gain from the first to the last in binomial standard
    errors; --plot draws the last run's curves with the first run's levels as lines
    (program/paper/plots.py)."""
    parser = flags.Parser(prog="eval.py compare", description=compare_main.__doc__.split("\n")[0])
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders, baseline first"
    )
    parser.add_argument("--plot", metavar="PNG", help="write the last run's curves here")
    parser.add_argument(
        "--title", help="the figure's title (default: model, method, task and data folder)"
    )
    args = parser.parse_args(argv)
    try:
        figure = plots.figure_class() if args.plot else None
        runs = load_finished(args.run_dirs)
        # everything is read and checked before anything is written
        table = report.compare_markdown(runs)
        if args.plot:
            fig = plots.run_curves(figure, runs[-1], runs[0] if len(runs) > 1 else None, args.title)
            folder, name = os.path.split(os.path.abspath(args.plot))
            report.save(
                folder,
                {},
                {name: fig},
                reads=files_read(args.run_dirs),
                where=f"--plot {args.plot}",
            )
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.strerror} ({err.filename})", file=sys.stderr)
        return 2
    print(table)
    if args.plot:
        print(f"curves: {args.plot}")
    return 0


def report_main(argv):
    """`eval.py report RUN_DIR... [--out DIR] [--plot]`: the Markdown report
    (program/paper/report.py)."""
    parser = flags.Parser(prog="eval.py report", description=report.__doc__.split("\n")[0])
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or folders of runs"
    )
    parser.add_argument("--out", help="write report.md and report_*.csv (and the plots) here")
    parser.add_argument(
        "--plot", action="store_true", help="also write PNG loss curves and memory bars"
    )
    args = parser.parse_args(argv)
    try:
        if args.plot and args.out is None:
            raise data.DataError("--plot needs --out DIR (command line)")
        figure = plots.figure_class() if args.plot else None
        runs = load_runs(args.run_dirs)
        # everything is read and checked before anything is written
        markdown, files = report.build(runs)
        figures = plots.figures(figure, runs) if args.plot else {}
        written = (
            []
            if args.out is None
            else report.save(
                args.out,
                {"report.md": markdown, **files},
                figures,
                reads=files_read(run.path for run in runs),
                where=f"--out {args.out}",
            )
        )
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.strerror} ({err.filename})", file=sys.stderr)
        return 2
    print(markdown)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser():
    p = flags.Parser(
        description="Zero-shot / ICL / saved-model evaluation (run.py --trainer none)."
    )
    p.add_argument("--task", default="SST2")
    p.add_argument("--model", default=models.TINY_OPT, help="checkpoint dir or cached hub name")
    p.add_argument("--adapter", help="LoRA / prefix adapter file written by train.py")
    p.add_argument("--data_dir", help="official data files (default: the bundled samples)")
    p.add_argument("--output_dir", help="write config.json and results.json here")
    p.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace the run in --output_dir"
    )
    p.add_argument(
        "--num_train", type=int, default=0, help="ICL demonstrations per example (0: zero-shot)"
    )
    p.add_argument("--num_eval", type=int, default=1000)
    p.add_argument("--k", type=int, default=16, help="RoBERTa: k-shot split")
    p.add_argument("--train_set_seed", type=int, default=42, help="RoBERTa: k-shot data seed")
    p.add_argument("--sfc", action="store_true", help="SFC calibration")
    p.add_argument(
        "--icl_sfc", action="store_true", help="SFC calibration keeping the demonstrations"
    )
    p.add_argument(
        "--no_bos_override", action="store_true", help="OPT: keep </s> as BOS (original forces <s>)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="examples per scoring batch")
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument(
        "--per_candidate",
        action="store_true",
        help="one sequence per candidate, as the original (default: one shared prompt per example)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="auto", help="auto: cuda when CUDA is there, else cpu")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare_main(argv[1:])
    args = parse_args(argv)
    lock = FolderLock(args.output_dir or "")  # held from the folder's check to the last write
    try:
        flags.check_values(args, RULES)
        if args.device == "auto":  # what is recorded is the device used
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.output_dir:
            reads = [
                ("model", str(models.resolve_model_path(args.model))),
                ("adapter", args.adapter),
                ("data", args.data_dir or data.SAMPLES_DIR),
            ]
            args.output_dir = check_run_folder(
                args.output_dir, resume=False, overwrite=args.overwrite_output_dir, protected=reads
            )
            lock = FolderLock(args.output_dir).acquire()
        model, tok = load(args.model, args.adapter, args.dtype, args.device)
        args.max_length = min(args.max_length, models.max_positions(model.config))  # what it used
        task = data.get_task(args.task, family=model.config.model_type)
        # LM-BFF prompt-based scoring, no demonstrations (few_shot_type=prompt)
        if task.family == "roberta":
            if args.num_train:
                raise data.DataError(
                    f"in-context demonstrations are for OPT tasks, not {task.name} (--num_train)"
                )
            test, demo_sets = (
                task.load(args.data_dir, k=args.k, seed=args.train_set_seed)["test"],
                None,
            )
        else:
            splits = task.load(args.data_dir)
            if args.num_train > len(splits["train"]):
                raise data.DataError(
                    f"{args.num_train} demonstrations asked, the train split holds "
                    f"{len(splits['train'])} (--num_train {args.num_train})"
                )
            test, demo_sets = data.icl_splits(splits, args.num_train, args.num_eval)
        if (args.sfc or args.icl_sfc) and task.generation:  # known now, not in the scoring
            raise data.DataError(
                f"SFC calibration is not defined for generation tasks like {task.name} "
                f"(--{'sfc' if args.sfc else 'icl_sfc'})"
            )
        if not test:  # an empty evaluation file: nothing to score (a mean of no rows)
            raise data.DataError(
                f"no evaluation examples for {task.name} (--data_dir "
                f"{args.data_dir or data.SAMPLES_DIR})"
            )
    except BaseException as e:  # nothing was written: the folder is left as it was
        lock.abandon()
        if not isinstance(e, ValueError):  # a bug or an interrupt: its traceback
            raise
        print(f"error: {e}", file=sys.stderr)  # ModelError, DataError: one line
        return 2
    try:
        return run_eval(args, model, tok, task, test, demo_sets)
    finally:
        lock.release()


def run_eval(args, model, tok, task, test, demo_sets):
    """Score the test examples; with --output_dir, write config.json and results.json."""
    start = time.time()
    metrics = evaluate(
        model,
        tok,
        task,
        test,
        demo_sets=demo_sets if args.num_train else None,
        batch_size=args.batch_size,
        sfc=args.sfc,
        icl_sfc=args.icl_sfc,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        bos_override=not args.no_bos_override,
        shared=not args.per_candidate,
    )
    print(json.dumps({"task": task.name, "num_train": args.num_train, "test": metrics}))
    if args.output_dir:
        config = {
            **vars(args),
            "kind": "eval",
            "family": task.family,
            "trainer": "none",
            "mode": None,
        }
        results = {
            "test": metrics,
            "num_test": len(test),
            "dev": {},
            "time_s": time.time() - start,
            "peak_memory_bytes": peak_memory(args.device),
            "device": args.device,
            "num_params": sum(p.numel() for p in model.parameters()),
        }
        # the replaced run's own files go, nothing else
        prepare_run_folder(args.output_dir, resume=False)
        os.makedirs(args.output_dir, exist_ok=True)
        for name, obj in (("config.json", config), ("results.json", results)):
            write_json(os.path.join(args.output_dir, name), obj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
