"""`python -m program.prompts <task>`: print the prompts of the first examples, to check them
byte for byte.

Examples:
    python -m program.prompts SST2 --show 2     # OPT SST2 on the bundled samples, validation split
    python -m program.prompts Copa --split train --demos 2 --repr
    python -m program.prompts SST-2 --family roberta --k 16 --seed 42 --split test
Text only (no tokenizer): OPT prompts as `encode_prompt` builds them before tokenization, one per
candidate; RoBERTa prompts rendered from the LM-BFF template with <s>, <mask> and </s>.
"""

import sys

from data import DataError, get_task, icl_demo_sets, prompt_texts

from .flags import Parser


def _show(text, as_repr):
    print(repr(text) if as_repr else text)


def main(argv=None):
    p = Parser(
        prog="python -m program.prompts",
        description="Print the prompts of a task's first examples.",
    )
    p.add_argument(
        "task", help="task name, e.g. SST2, Copa, SQuAD (OPT) or SST-2, sst-5, trec (RoBERTa)"
    )
    p.add_argument(
        "--family", choices=("opt", "roberta"), help="model family when the name is ambiguous (RTE)"
    )
    p.add_argument("--data_dir", help="where the data lives (default: the bundled samples)")
    p.add_argument("--show", type=int, default=3, help="number of examples (default 3)")
    p.add_argument(
        "--split",
        help="OPT: train or valid (default valid); RoBERTa: train, dev or test (default test)",
    )
    p.add_argument(
        "--demos", type=int, default=0, help="OPT: ICL demonstrations per example, as icl.sh"
    )
    p.add_argument("--sfc", action="store_true", help="OPT: SFC calibration prompts")
    p.add_argument("--k", type=int, default=16, help="RoBERTa: examples per class")
    p.add_argument("--seed", type=int, default=42, help="RoBERTa: data seed")
    p.add_argument(
        "--repr", action="store_true", help="print Python reprs (shows newlines and spaces)"
    )
    args = p.parse_args(argv)
    try:
        for name, least in (("show", 1), ("demos", 0), ("k", 1)):
            if getattr(args, name) < least:
                raise DataError(f"{name} must be >= {least} (--{name} {getattr(args, name)})")
        task = get_task(args.task, family=args.family)
        if task.family == "roberta":
            split = args.split or "test"
            samples = task.load(args.data_dir, k=args.k, seed=args.seed)
            if split not in samples:
                raise DataError(
                    f"unknown split {split!r}, expected one of {', '.join(samples)} (--split)"
                )
            for sample in samples[split][: args.show]:
                print(
                    f"--- {sample.where} label {sample.correct_candidate!r} "
                    f"(word {task.label_words[sample.correct_candidate]!r})"
                )
                _show(task.render(sample), args.repr)
            return
        split = args.split or "valid"
        splits = task.load(args.data_dir)
        if split not in splits:
            raise DataError(
                f"unknown split {split!r}, expected one of {', '.join(splits)} (--split)"
            )
        samples = splits[split][: args.show]
        demo_sets = (
            icl_demo_sets(splits["train"], len(samples), args.demos)
            if args.demos
            else [[]] * len(samples)
        )
        for sample, demos in zip(samples, demo_sets):
            prompts, _, _ = prompt_texts(task, demos, sample, sfc=args.sfc)
            labels = (
                ["prompt"]
                if task.generation
                else [f"candidate {j}: {c!r}" for j, c in enumerate(sample.candidates)]
            )
            for label, prompt in zip(labels, prompts):
                print(f"--- {sample.where} {label} (correct: {sample.correct_candidate!r})")
                _show(prompt, args.repr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
