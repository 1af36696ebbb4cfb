"""Evaluation: zero-shot, in-context learning and saved models; `eval.py report` for paper tables.

    python eval.py --task SST2 --model facebook/opt-13b --num_train 0      # zero-shot row
    python eval.py --task SST2 --model facebook/opt-13b --num_train 32     # ICL row (icl.sh)
    python eval.py --task SST2 --model runs/x/model                        # a saved fine-tuned model
    python eval.py --task SST2 --model facebook/opt-13b --adapter runs/x/adapter.safetensors
    python eval.py report runs/* --plot --out report/                      # Tables 1, 18, 22
    python eval.py compare runs/demo-zo runs/demo-fo                       # runs side by side

Scoring is the original's (`run.py` `Framework.one_step_pred`, mezo_original.md §4), batched:
classification = argmax over candidates of the mean option-token log-prob (or the SFC-calibrated
sum difference with --sfc); SQuAD/DROP = greedy generation up to 50 new tokens or "\\n", scored by
SQuAD F1 / EM; RoBERTa = argmax over the label words' logits at <mask>. ICL draws one
demonstration set per test example, as the original does with no train_set_seed.
"""
import argparse
import json
import os
import sys
import time

import torch

import data
import models
from data import report
from zo.checkpoint import write_json


def encode_samples(task, samples, tok, *, demo_sets=None, generation_with_gold=False, sfc=False,
                   icl_sfc=False, max_length=2048, max_new_tokens=50, bos_override=True):
    """Encode each sample (with its own demonstrations, if any) for the task's model family."""
    if task.family == "roberta":
        return [task.encode(s, tok) for s in samples]
    demo_sets = demo_sets or [()] * len(samples)
    return [data.encode_prompt(task, demos, s, tok, max_length, sfc=sfc, icl_sfc=icl_sfc,
                               generation_with_gold=generation_with_gold, max_new_tokens=max_new_tokens,
                               bos_override=bos_override)
            for s, demos in zip(samples, demo_sets)]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def stop_ids(tok):
    """The original stops generation at "\\n" or </s> (`eos_token="\\n"` in run.py)."""
    return [tok.encode("\n", add_special_tokens=False)[-1], tok.eos_token_id]


def generate_text(model, tok, batch, max_new_tokens=50, max_length=2048):
    """Greedy continuations as stripped strings (`max_new_tokens=min(50, 2048 - len)`)."""
    budget = min(max_new_tokens, max_length - batch["input_ids"].shape[1])
    new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max(budget, 1),
                         eos_token_ids=stop_ids(tok))
    return [tok.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]


@torch.no_grad()
def evaluate(model, tok, task, samples, *, demo_sets=None, batch_size=8, sfc=False, icl_sfc=False,
             max_length=2048, max_new_tokens=50, bos_override=True):
    """Test metrics of `model` on `samples`: {"accuracy": ..} or {"f1": .., "em": ..}."""
    model.eval()
    device = next(model.parameters()).device
    kind = data.batch_kind(task, training=False)
    opts = dict(max_length=max_length, max_new_tokens=max_new_tokens, bos_override=bos_override)
    encoded = encode_samples(task, samples, tok, demo_sets=demo_sets, **opts)
    if sfc or icl_sfc:
        calib = encode_samples(task, samples, tok, demo_sets=demo_sets, sfc=sfc, icl_sfc=icl_sfc, **opts)
    predicted, correct = [], []
    for i, group in enumerate(chunks(encoded, batch_size)):
        batch = to_device(data.collate(group, kind, tok.pad_token_id), device)
        if kind == "prompt":
            predicted += generate_text(model, tok, batch, max_new_tokens, max_length)
            correct += batch["gold"]
            continue
        logits = model(batch["input_ids"], batch["attention_mask"])
        if sfc or icl_sfc:
            sfc_batch = to_device(data.collate(calib[i * batch_size:(i + 1) * batch_size], kind, tok.pad_token_id), device)
            scores = data.sfc_scores(logits, batch, model(sfc_batch["input_ids"], sfc_batch["attention_mask"]), sfc_batch)
            predicted += scores.argmax(-1).tolist()
        else:
            predicted += data.predictions(logits, batch).tolist()
        correct += [e.label for e in group] if task.family == "roberta" else [e.correct for e in group]
    if kind == "prompt":
        return {m: data.calculate_metric(m, predicted, correct) for m in ("f1", "em")}
    return {"accuracy": data.accuracy(predicted, correct)}


def load(model_path, adapter=None, dtype="fp32", device="cpu"):
    """A model (+ adapter file written by train.py) and its tokenizer."""
    model = models.load_model(model_path, dtype=DTYPES[dtype], device=device)
    if adapter:
        meta, state = models.read_adapter(adapter)
        if meta["mode"] == "lora":
            models.apply_lora(model, r=int(meta["lora_r"]), alpha=float(meta["lora_alpha"]))
        else:
            models.apply_prefix(model, num_prefix=int(meta["num_prefix"]), init_by_real_act=False)
        models.load_adapter(model, state)
    tok = models.load_tokenizer(model_path)
    return model, tok


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compare(run_dirs):
    """`eval.py compare RUN_DIR...`: runs side by side (the `make demo` table): dev loss at the
    first evaluation and of the selected model, test metric, peak memory, time per step."""
    print("| run | trainer | dev loss, first eval | dev loss, selected | test | peak memory (MiB) | ms/step |\n"
          "|---|---|---|---|---|---|---|")
    for d in run_dirs:
        try:
            config, res = (json.load(open(os.path.join(d, f))) for f in ("config.json", "results.json"))
        except (OSError, ValueError) as e:
            print(f"error: not a finished run: {e} ({d})", file=sys.stderr)
            return 2
        dev = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if "dev_loss" in line]
        test = ", ".join(f"{k} {v:.3f}" for k, v in res["test"].items())
        print(f"| {d} | {config['trainer']} | {dev[0]['dev_loss']:.3f} (step {dev[0]['step']}) | "
              f"{res['dev']['loss']:.3f} (step {res['best_step']}) | {test} | {res['peak_memory_bytes'] / 2**20:.0f} | "
              f"{1000 * res['time_per_step_s']:.1f} |")
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description="Zero-shot / ICL / saved-model evaluation (run.py --trainer none).")
    p.add_argument("--task", default="SST2")
    p.add_argument("--model", default=models.TINY_OPT, help="checkpoint dir or cached hub name")
    p.add_argument("--adapter", help="LoRA / prefix adapter file written by train.py")
    p.add_argument("--data_dir", help="official data files (default: the bundled samples)")
    p.add_argument("--output_dir", help="write config.json and results.json here")
    p.add_argument("--num_train", type=int, default=0, help="ICL demonstrations per example (0: zero-shot)")
    p.add_argument("--num_eval", type=int, default=1000)
    p.add_argument("--k", type=int, default=16, help="RoBERTa: k-shot split")
    p.add_argument("--train_set_seed", type=int, default=42, help="RoBERTa: k-shot data seed")
    p.add_argument("--sfc", action="store_true", help="SFC calibration")
    p.add_argument("--icl_sfc", action="store_true", help="SFC calibration keeping the demonstrations")
    p.add_argument("--no_bos_override", action="store_true", help="OPT: keep </s> as BOS (original forces <s>)")
    p.add_argument("--batch_size", type=int, default=8, help="examples per scoring batch")
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--max_new_tokens", type=int, default=50)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report.report_main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare(argv[1:])
    args = parse_args(argv)
    try:
        model, tok = load(args.model, args.adapter, args.dtype, args.device)
        task = data.get_task(args.task, family=model.config.model_type)
        if task.family == "roberta":  # LM-BFF prompt-based scoring, no demonstrations (few_shot_type=prompt)
            if args.num_train:
                raise data.DataError(f"in-context demonstrations are for OPT tasks, not {task.name} (--num_train)")
            test, demo_sets = task.load(args.data_dir, k=args.k, seed=args.train_set_seed)["test"], None
        else:
            test, demo_sets = data.icl_splits(task.load(args.data_dir), args.num_train, args.num_eval)
        if args.output_dir and os.path.exists(os.path.join(args.output_dir, "results.json")):
            raise data.DataError(f"output folder already holds results ({args.output_dir})")
    except ValueError as e:  # ModelError, DataError
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    metrics = evaluate(model, tok, task, test, demo_sets=demo_sets if args.num_train else None,
                       batch_size=args.batch_size, sfc=args.sfc, icl_sfc=args.icl_sfc, max_length=args.max_length,
                       max_new_tokens=args.max_new_tokens, bos_override=not args.no_bos_override)
    print(json.dumps({"task": task.name, "num_train": args.num_train, "test": metrics}))
    if args.output_dir:
        config = {**vars(args), "kind": "eval", "family": task.family, "trainer": "none", "mode": None}
        results = {"test": metrics, "dev": {}, "time_s": time.time() - start, "device": args.device,
                   "num_params": sum(p.numel() for p in model.parameters())}
        os.makedirs(args.output_dir, exist_ok=True)
        for name, obj in (("config.json", config), ("results.json", results)):
            write_json(os.path.join(args.output_dir, name), obj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
