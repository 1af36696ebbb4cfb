"""`make gpu-check`: every GPU claim of the project in one command, at most ~8 minutes on one H100.

    python3 tests/bench/gpu_check.py [--out gpu-results.json]     # needs CUDA; exit 2 without it
    python3 tests/bench/gpu_check.py --cpu-smoke --out X.json     # the same machinery at tiny sizes
                                                                  # on the CPU
                                                                  (tests/test_gpu_check.py)

First every CUDA-marked test (`pytest -m cuda tests`; on a GPU a skipped one counts as a failure),
then the rows below, each a ratio taken within this run. Prints one Markdown table and writes every
number, the device, torch, CUDA and driver versions to the JSON file. Models are random-init, built
here (meta device, then bf16 storage on the GPU): no network, no checkpoint files. Any error is a
FAILED row and the exit status is 1; nothing is skipped.

1. perturbation: one fused perturb_ over 1B bf16 elements vs a device-to-device copy_ of the same
   bytes (goal: >= 80% of the copy's bandwidth);
1b. the update of N = 2, 4, 8 directions (n-SPSA, FZOO, --parallel directions): one fused pass vs
   N passes over the same 1B bf16 elements (reported; bandwidth-bound passes would give 1/N);
2. MeZO step / two plain forwards at OPT-1.3b shape, bf16, batch 16 x 64 (goal <= 1.10x), eager and
   captured as CUDA graphs (zo/graphs.py);
3. RoBERTa-large shape, batch 64 x 128 (the paper's RoBERTa setting): steps/s eager and graphed;
4. peak memory (max_memory_allocated) of a MeZO step over inference on the same batch, at OPT-1.3b
   and at the largest OPT shape whose bf16 weights fit with room for activations (goal <= 1.05x),
   with backprop + AdamW beside it (out of memory is reported, not a failure, at the largest shape);
5. our OPT forward over transformers' at OPT-1.3b shape in bf16 (goal <= 1.0x).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model as B  # noqa: E402  (puts the repository root on sys.path)
import bench_perturb  # noqa: E402

import models  # noqa: E402
from data.files import atomic_write  # noqa: E402
from data.losses import mlm_loss  # noqa: E402
from models.opt import OPT, OPTConfig  # noqa: E402
from models.roberta import RobertaConfig, RobertaMLM  # noqa: E402
from zo import FO, CudaGraphStep, FOConfig, MeZO, MeZOConfig  # noqa: E402
from zo.kernels import get_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("tests", "perturb", "update_many", "step.opt", "step.roberta", "memory", "forward")
# OPT shapes beyond bench_model's (hidden, layers, heads, ffn), largest last
OPT_SHAPES = {
    **B.SHAPES,
    "2.7b": (2560, 32, 32, 10240),
    "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480),
    "30b": (7168, 48, 56, 28672),
    "66b": (9216, 64, 72, 36864),
}
ROBERTA = {
    "large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
}
FULL = dict(
    device="cuda",
    perturb_n=1_000_000_000,
    perturb_repeats=10,
    opt="1.3b",
    opt_vocab=50272,
    opt_batch=(16, 64),
    roberta="large",
    roberta_vocab=50265,
    roberta_batch=(64, 128),
    repeats=10,
    memory_shapes=("1.3b", "largest"),
)
SMOKE = dict(
    device="cpu",
    perturb_n=100_000,
    perturb_repeats=1,
    opt="tiny",
    opt_vocab=1000,
    opt_batch=(2, 16),
    roberta="tiny",
    roberta_vocab=1000,
    roberta_batch=(2, 16),
    repeats=1,
    memory_shapes=("tiny",),
)


# ---------------------------------------------------------------- models, built in place in bf16


def build(make, device: str, dtype=torch.bfloat16):
    """A random-init model without a full-precision copy: shapes on the meta device, storage
    allocated on `device` in `dtype`, weights N(0, 0.02), LayerNorm weights 1."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = make()
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each owner of a tied Parameter its own tensor
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def opt(shape: str, vocab: int, device: str) -> OPT:
    hidden, layers, heads, ffn = OPT_SHAPES[shape]
    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
    )
    return build(lambda: OPT(cfg), device)


def roberta(shape: str, vocab: int, device: str) -> RobertaMLM:
    cfg = RobertaConfig(
        vocab_size=vocab,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        **ROBERTA[shape],
    )
    return build(lambda: RobertaMLM(cfg), device)


def largest_opt_shape(vocab: int) -> str:
    """The largest OPT whose bf16 weights take at most 75% of the device (room for activations and
    MeZO's one perturbed copy of the largest parameter)."""
    total = torch.cuda.get_device_properties(0).total_memory
    fits = [s for s in OPT_SHAPES if 2 * sum(_opt_numel(s, vocab)) <= 0.75 * total]
    return fits[-1]


def _opt_numel(shape: str, vocab: int) -> tuple[int, int]:
    hidden, layers, _, ffn = OPT_SHAPES[shape]
    return vocab * hidden + 2050 * hidden, layers * (4 * hidden * hidden + 2 * hidden * ffn)


def opt_batch(size, seq, vocab, device) -> dict:
    ids, mask = B.batch(size, seq, vocab, device)
    return {"ids": ids, "mask": mask}


def opt_loss(model, batch):
    return B.lm_loss(batch["ids"], batch["mask"])(model)


def roberta_batch(size, seq, vocab, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (size, seq), generator=g).to(device)
    return {
        "ids": ids,
        "mask": torch.ones_like(ids),
        "mask_pos": torch.full((size,), seq // 2, device=device),
        "label_word_ids": torch.tensor([100, 200], device=device),
        "labels": torch.randint(0, 2, (size,), generator=g).to(device),
    }


def roberta_loss(model, batch):
    return mlm_loss(model(batch["ids"], batch["mask"]), batch)


# ---------------------------------------------------------------- rows


def row(id, what, value, unit, op, target, notes="") -> dict:
    met = None if op is None else (value >= target if op == ">=" else value <= target)
    return {
        "id": id,
        "row": what,
        "measured": value,
        "unit": unit,
        "goal": "-" if op is None else f"{op} {target}",
        "verdict": "info" if met is None else ("meets" if met else "misses"),
        "notes": notes,
    }


def failed(id, what, error: BaseException) -> dict:
    line = (str(error).strip().splitlines() or [""])[0][:300]
    return {
        "id": id,
        "row": what,
        "measured": None,
        "unit": "",
        "goal": "-",
        "verdict": f"FAILED: {type(error).__name__}: {line}",
        "notes": "",
        "traceback": traceback.format_exc(),
    }


def perturb_row(plan) -> list[dict]:
    device, n = plan["device"], plan["perturb_n"]
    p = torch.zeros(n, dtype=torch.bfloat16, device=device)
    q = torch.empty_like(p)
    scalar = lambda v, dtype=torch.int64: torch.full((), v, dtype=dtype, device=device)  # noqa: E731
    args = dict(
        seed=scalar(123456789),
        key=scalar(987654321),
        offset=scalar(0),
        scale=scalar(1e-3, torch.float32),
    )
    kernels = get_kernels("normal")
    times = B.interleaved(
        {"fused": lambda: kernels.perturb_(p, **args), "copy_": lambda: q.copy_(p)},
        plan["perturb_repeats"],
        device,
    )
    ms, r = B.medians_ms(times), B.ratio(times, "copy_", "fused")
    gbs = 4 * n / (ms["fused"] / 1e3) / 1e9  # reads and writes 2 bytes per element
    return [
        row(
            "perturb.bandwidth",
            f"fused perturb_ over {n / 1e9:g}B bf16: fraction of copy_ bandwidth",
            r["median"],
            "x",
            ">=",
            0.8,
            f"fused {ms['fused']:.2f} ms ({gbs:.0f} GB/s), copy_ {ms['copy_']:.2f} ms",
        )
    ]


def update_many_rows(plan) -> list[dict]:
    """A step's N updates in one fused pass vs N passes over the same bf16 elements (issue 31):
    bandwidth-bound passes would give 1/N; the hash's compute sets how close it gets."""
    n = plan["perturb_n"]
    r = bench_perturb.update_many(
        n, repeats=plan["perturb_repeats"], device=plan["device"], dtype=torch.bfloat16
    )
    return [
        row(
            f"update_many.n{count}",
            f"update of {count} directions over {n / 1e9:g}B bf16: one fused pass / {count} passes",
            m["ratio"]["median"],
            "x",
            None,
            None,
            f"fused {m['ms']['fused']:.2f} ms, passes {m['ms']['passes']:.2f} ms (1/N = "
            f"{1 / count:.3f}); bitwise equal: {m['bitwise']}",
        )
        for count, m in r.items()
    ]


def step_rows(plan, family: str) -> list[dict]:
    """Eager and graphed MeZO steps against two plain forwards, interleaved."""
    device = plan["device"]
    shape, vocab, (size, seq) = (plan[family], plan[f"{family}_vocab"], plan[f"{family}_batch"])
    make, make_batch, loss = (
        (opt, opt_batch, opt_loss) if family == "opt" else (roberta, roberta_batch, roberta_loss)
    )
    model = make(shape, vocab, device)
    data = make_batch(size, seq, vocab, device)
    eager = MeZO(model, MeZOConfig(lr=1e-9, eps=1e-3))

    @torch.no_grad()
    def two_forwards():
        loss(model, data)
        loss(model, data)

    fns = {
        "two forwards": two_forwards,
        "eager step": lambda: eager.step(model, lambda m: loss(m, data)),
    }
    graph_error = None
    try:
        graphed = CudaGraphStep(MeZO(model, MeZOConfig(lr=1e-9, eps=1e-3)), model, loss)
        fns["graphed step"] = lambda: graphed(data)
    except ValueError as e:  # no CUDA (the CPU smoke run): the graphed rows fail below
        graph_error = e
    times = B.interleaved(fns, plan["repeats"], device)
    ms = B.medians_ms(times)
    what = f"{'OPT' if family == 'opt' else 'RoBERTa'}-{shape} shape, {size}x{seq} bf16"
    rows = []
    for kind in ("eager", "graphed"):
        id = f"step.{family}.{kind}"
        if kind == "graphed" and graph_error is not None:
            rows.append(failed(id, f"MeZO step captured as CUDA graphs, {what}", graph_error))
            continue
        r = B.ratio(times, f"{kind} step", "two forwards")
        notes = f"step {ms[f'{kind} step']:.1f} ms, two forwards {ms['two forwards']:.1f} ms"
        if family == "opt":
            rows.append(
                row(
                    id,
                    f"MeZO step ({kind}) / two forwards, {what}",
                    r["median"],
                    "x",
                    "<=",
                    1.10,
                    notes,
                )
            )
        else:
            rows.append(
                row(
                    id,
                    f"MeZO steps/s ({kind}), {what}",
                    1e3 / ms[f"{kind} step"],
                    "steps/s",
                    None,
                    None,
                    notes + f"; {r['median']:.2f}x two forwards",
                )
            )
    return rows


def peak_of(fn, device: str) -> float:
    """Peak memory of one call of fn (after a warm-up call), in MiB: allocated tensors on CUDA, the
    process's resident set on the CPU (smoke run only)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return B._status_mib("VmHWM")


def memory_rows(plan) -> list[dict]:
    device, vocab, (size, seq) = plan["device"], plan["opt_vocab"], plan["opt_batch"]
    rows = []
    for shape in plan["memory_shapes"]:
        shape = largest_opt_shape(vocab) if shape == "largest" else shape
        peaks, notes = {}, []
        for mode in ("inference", "mezo", "backprop_adamw"):
            model = opt(shape, vocab, device)
            data = opt_batch(size, seq, vocab, device)
            if mode == "inference":
                trainer = None
            elif mode == "mezo":
                trainer = MeZO(model, MeZOConfig(lr=1e-9, eps=1e-3))
            else:
                trainer = FO(model, FOConfig(lr=1e-9, optimizer="adam", lr_scheduler="constant"))

            def run(trainer=trainer, model=model, data=data):
                if trainer is None:
                    with torch.no_grad():
                        opt_loss(model.eval(), data)
                else:
                    trainer.step(model, lambda m: opt_loss(m, data))

            try:
                peaks[mode] = peak_of(run, device)
            except torch.OutOfMemoryError:
                if mode != "backprop_adamw":
                    raise
                notes.append("backprop+AdamW: out of memory")
            del model, trainer, data, run
            if device == "cuda":
                torch.cuda.empty_cache()
        ratio = peaks["mezo"] / peaks["inference"]
        adam = (
            f"{peaks['backprop_adamw']:.0f} MiB "
            f"({peaks['backprop_adamw'] / peaks['inference']:.2f}x)"
            if "backprop_adamw" in peaks
            else "out of memory"
        )
        rows.append(
            row(
                f"memory.{shape}",
                f"peak memory, OPT-{shape} shape, {size}x{seq} bf16: MeZO / inference",
                ratio,
                "x",
                "<=",
                1.05,
                f"inference {peaks['inference']:.0f} MiB, MeZO {peaks['mezo']:.0f} MiB,"
                f" backprop+AdamW {adam}",
            )
        )
    return rows


def forward_row(plan) -> list[dict]:
    import transformers

    device, vocab, shape, (size, seq) = (
        plan["device"],
        plan["opt_vocab"],
        plan["opt"],
        plan["opt_batch"],
    )
    transformers.utils.logging.disable_progress_bar()
    with torch.device(device):
        hf = transformers.OPTForCausalLM(transformers.OPTConfig(**B.config_kwargs(shape, vocab)))
    hf = hf.to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = models.load_model(tmp).to(device=device, dtype=torch.bfloat16).eval()
    ids, mask = B.batch(size, seq, vocab, device)
    fns = {
        "ours": lambda: ours(ids, mask),
        "transformers": lambda: hf(input_ids=ids, attention_mask=mask),
    }
    with torch.no_grad():
        diff = (fns["ours"]().float() - fns["transformers"]().logits.float()).abs().max().item()
        times = B.interleaved(fns, plan["repeats"], device)
    ms, r = B.medians_ms(times), B.ratio(times, "ours", "transformers")
    return [
        row(
            "forward.vs_transformers",
            f"forward, OPT-{shape} shape, {size}x{seq} bf16: ours / transformers",
            r["median"],
            "x",
            "<=",
            1.0,
            f"ours {ms['ours']:.1f} ms, transformers {ms['transformers']:.1f} ms "
            f"({hf.config._attn_implementation}); max abs logit diff {diff:.2e}",
        )
    ]


def cuda_tests() -> list[dict]:
    """Every CUDA-marked test; a skip counts as a failure here (there is a GPU)."""
    report = Path(tempfile.mkdtemp()) / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=360)
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = proc.returncode == 0 and counts["skipped"] == 0 and passed > 0
    bad = [case.get("name") for case in suite.iter("testcase") if len(case)]
    return [
        {
            "id": "tests.cuda",
            "row": "CUDA-marked tests (pytest -m cuda)",
            "measured": passed,
            "unit": "passed",
            "goal": "all pass, none skipped",
            "verdict": "meets" if ok else f"FAILED: {', '.join(bad) or proc.stdout[-300:]}",
            "notes": f"{counts}",
            "output": proc.stdout[-5000:] + proc.stderr[-3000:],
        }
    ]


# ---------------------------------------------------------------- main


def versions() -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except OSError as e:
            info["driver"] = f"unknown ({e})"
    else:
        info["device"] = "cpu (smoke run)"
    return info


def fmt(r) -> str:
    v = r["measured"]
    if v is None:
        return "-"
    return (
        f"{v}{' ' + r['unit']}"
        if isinstance(v, int)
        else f"{v:.2f}{'x' if r['unit'] == 'x' else ' ' + r['unit']}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-results.json")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the machinery only"
    )
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "error: make gpu-check needs a CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    plan = SMOKE if args.cpu_smoke else FULL
    start, rows = time.time(), []
    sections = {
        "tests": cuda_tests,
        "perturb": lambda: perturb_row(plan),
        "update_many": lambda: update_many_rows(plan),
        "step.opt": lambda: step_rows(plan, "opt"),
        "step.roberta": lambda: step_rows(plan, "roberta"),
        "memory": lambda: memory_rows(plan),
        "forward": lambda: forward_row(plan),
    }
    chosen = args.only or [s for s in SECTIONS if not (args.cpu_smoke and s == "tests")]
    for name, section in ((s, sections[s]) for s in chosen):
        t0 = time.time()
        try:
            rows += section()
        except Exception as e:  # a failed row, never a skipped one
            rows.append(failed(name, name, e))
        print(f"[gpu-check] {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    result = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "versions": versions(),
        "plan": plan,
        "total_s": round(time.time() - start, 1),
        "rows": rows,
    }
    print(
        f"device: {result['versions']['device']}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, driver {result['versions'].get('driver', '-')}"
    )
    print("| row | measured | goal | verdict | notes |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {fmt(r)} | {r['goal']} | {r['verdict']} | {r['notes']} |")
    atomic_write(args.out, json.dumps(result, indent=1, default=str))
    print(f"total {result['total_s']:.0f} s; {args.out}")
    return 1 if any(r["verdict"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
