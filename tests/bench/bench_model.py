"""Benchmarks at OPT shapes (README, "Tests and benchmarks"): our forward vs transformers', a MeZO
step vs two forwards, and the peak memory of MeZO training vs inference vs backprop + AdamW.

Method. Time: the variants of one comparison run interleaved (A B C, then C B A, ...) after one
warm-up call each (which also compiles the fused kernels), so drift on this shared machine hits all
of them alike; a ratio is the median over repetitions of the per-repetition ratio, reported with its
min-max spread. On CUDA every timed call is bracketed by synchronize(). Memory: each (mode, shape,
batch) runs in a fresh subprocess (`python bench_model.py memory ...`): build the model and note the
RSS, run the mode once (warm-up: compiles, creates the Adam state), reset the high-water mark (`echo
5 > /proc/self/clear_refs` resets VmHWM and ru_maxrss), run it again and read VmHWM: the step's
peak. Reported as the absolute peak, its increase over the post-build RSS, and the RSS before the
measured step (what the warm-up left: the torch.compile runtime and kernels for MeZO, the AdamW
state for backprop). On CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors
only, no code). The loss everywhere is the one MeZO trains with (data/losses.py `option_lm_loss`):
next-token cross-entropy on the last 4 tokens of each row of a random batch (all tokens attended),
logits computed at those positions only (`logits_to_keep`). A loss over every position would add two
logits-sized temporaries to every mode and measure the loss, not MeZO.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import models  # noqa: E402
from data.collate import per_row_scoring  # noqa: E402
from data.losses import batch_loss, task_loss  # noqa: E402
from models.opt import OPT, OPTConfig  # noqa: E402
from program.run import paired_loss  # noqa: E402
from zo import FO, FOConfig, MeZO, MeZOConfig  # noqa: E402

# OPT shapes (hidden, layers, heads, ffn); vocabulary 50272 and 2048 positions as every OPT size.
SHAPES = {
    "tiny": (64, 2, 4, 256),
    "small": (256, 4, 4, 1024),
    "125m": (768, 12, 12, 3072),
    "1.3b": (2048, 24, 32, 8192),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def config_kwargs(shape: str, vocab: int) -> dict:
    hidden, layers, heads, ffn = SHAPES[shape]
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        max_position_embeddings=2048,
    )


def build(shape: str, vocab: int, device: str = "cpu", dtype: str = "fp32") -> OPT:
    """Our OPT at `shape`, weights N(0, 0.02) as OPT's init_std, in eval mode."""
    with torch.device(device):
        model = OPT(OPTConfig(**config_kwargs(shape, vocab)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(DTYPES[dtype]).eval()


def batch(
    size: int, seq: int, vocab: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (size, seq), generator=g)
    return ids.to(device), torch.ones_like(ids)


def lm_loss(ids, mask, answer_tokens=4, paired=False):
    """loss_fn(model): the loss MeZO trains with (data/losses.py `option_lm_loss`, the original's
    `forward_wrap_with_option_len`): next-token cross-entropy on the last `answer_tokens` tokens
    of each row (the answer), log-softmax over that window only, logits kept there only. paired:
    the same loss as train.py's zo.PairedLoss (program/run.py paired_loss), for
    perturbation="paired"."""
    scoring = per_row_scoring(ids.cpu(), [answer_tokens] * ids.shape[0])
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        **{k: v.to(ids.device) for k, v in scoring.items()},
    }
    return paired_loss(task_loss, batch, 1.0) if paired else lambda model: batch_loss(model, batch)


def last_position_loss(ids, mask):
    """loss_fn(model) that reads the logits of the last position only (a single-token candidate's
    score; models' `logits_to_keep=1`, issue 20): the body's last hidden state, made contiguous,
    under the LM head. Contiguous because F.linear folds a strided [B, 1, D] input into one mm only
    when the weight requires grad; MeZO's perturbed head weight does not, and the strided input then
    runs as a
    bmm over a [B, D, V] expanded weight (about 5x the mm on this CPU)."""
    target = ids[:, 0]

    def loss(model):
        h = getattr(model, model.body)(ids, mask)[:, -1:].contiguous()
        return torch.nn.functional.cross_entropy(model.lm_head(h)[:, 0].float(), target)

    return loss


# ---------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict, repeats: int, device: str = "cpu", warmup: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each fn, the order reversed every other repetition, after a warm-up."""
    for fn in fns.values() if warmup else ():
        fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, a: str, b: str) -> dict:
    """Median and spread of the per-repetition ratio a / b."""
    rs = [x / y for x, y in zip(times[a], times[b])]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def medians_ms(times: dict) -> dict:
    return {name: round(1e3 * statistics.median(ts), 2) for name, ts in times.items()}


# ---------------------------------------------------------------- row 2: forward vs transformers


def forward_vs_transformers(
    shape: str, vocab: int, size: int, seq: int, repeats: int, tmp: Path
) -> dict:
    """OPTForCausalLM random-init, save_pretrained, loaded by models.load_model: no_grad, eval, CPU
    fp32."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's, on stderr
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**config_kwargs(shape, vocab))).eval()
    hf.save_pretrained(tmp)
    ours = models.load_model(tmp)
    ids, mask = batch(size, seq, vocab)
    with torch.no_grad():
        max_diff = (
            (ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits).abs().max().item()
        )

    @torch.no_grad()
    def run_ours():
        ours(ids, mask)

    @torch.no_grad()
    def run_hf():
        hf(input_ids=ids, attention_mask=mask)

    # warmed above
    times = interleaved({"ours": run_ours, "transformers": run_hf}, repeats, warmup=False)
    return {
        "shape": shape,
        "batch": [size, seq],
        "repeats": repeats,
        "ms": medians_ms(times),
        "ratio": ratio(times, "ours", "transformers"),
        "max_abs_logit_diff": max_diff,
        "attn_implementation": hf.config._attn_implementation,
        "transformers": transformers.__version__,
    }


# --------------------------------------------------------------- row 3: a MeZO step vs two forwards


def step_vs_forwards(
    shape: str,
    vocab: int,
    size: int,
    seq: int,
    repeats: int,
    device: str = "cpu",
    dtype: str = "fp32",
    reference_repeats: int = 2,
    model=None,
    loss=lm_loss,
    rademacher: bool = False,
) -> dict:
    """One ZO-SGD step (fused) against two no_grad forwards, with one perturbed copy of every
    parameter (`perturbed_`: what each perturbed forward adds) in the same interleaving, and with
    `rademacher` the same step with Rademacher z (the hash without a Gaussian transform: what the
    step's structure costs whatever the transform); then, in a shorter second interleaving (it is
    slow; skipped when reference_repeats is 0), the step with the original's operations
    (perturbation="reference").
    `loss(ids, mask)` builds the loss closure."""
    # model: e.g. build_llama's
    model = build(shape, vocab, device, dtype) if model is None else model
    ids, mask = batch(size, seq, vocab, device)
    loss_fn = loss(ids, mask)
    fused = MeZO(model, MeZOConfig(lr=1e-7, eps=1e-3))
    original = MeZO(model, MeZOConfig(lr=1e-7, eps=1e-3, perturbation="reference"))
    slots = fused.slots
    seed, zero, scale = (torch.full((), v, device=device) for v in (12345, 0, 1e-3))

    def perturbed_copies():
        for s in slots:
            fused.direction.kernels(s).perturbed_(
                torch.empty_like(s.param),
                src=s.param,
                seed=seed,
                key=s.key_t,
                offset=zero,
                scale=scale,
            )

    @torch.no_grad()
    def two_forwards():
        loss_fn(model)
        loss_fn(model)

    fns = {
        "two forwards": two_forwards,
        "MeZO step (fused)": lambda: fused.step(model, loss_fn),
        "perturbed pass over all params": perturbed_copies,
    }
    if rademacher:
        signs = MeZO(model, MeZOConfig(lr=1e-7, eps=1e-3, distribution="rademacher"))
        fns["MeZO step (fused, Rademacher z)"] = lambda: signs.step(model, loss_fn)
    times = interleaved(fns, repeats, device)
    ref_times = (
        interleaved(
            {
                "two forwards": two_forwards,
                "MeZO step (reference)": lambda: original.step(model, loss_fn),
            },
            # nothing to compile
            reference_repeats,
            device,
            warmup=False,
        )
        if reference_repeats
        else None
    )
    return {
        "shape": shape,
        "device": device,
        "dtype": dtype,
        "batch": [size, seq],
        "repeats": repeats,
        "reference_repeats": reference_repeats,
        "params": sum(s.param.numel() for s in slots),
        "ms": medians_ms(times),
        "reference_ms": medians_ms(ref_times) if ref_times else None,
        "fused": ratio(times, "MeZO step (fused)", "two forwards"),
        "perturbed_pass": ratio(times, "perturbed pass over all params", "two forwards"),
        "reference": ratio(ref_times, "MeZO step (reference)", "two forwards")
        if ref_times
        else None,
        "rademacher": ratio(times, "MeZO step (fused, Rademacher z)", "two forwards")
        if rademacher
        else None,
    }


# --------------------------------------------------------------- LLaMA family: SmolLM2-135M's shape

# (hidden, layers, heads, kv heads, ffn, vocab): SmolLM2-135M, and a tiny one for --quick
LLAMA_SHAPES = {"smollm2-135m": (576, 30, 9, 3, 1536, 49152), "tiny": (64, 2, 4, 2, 128, 1000)}


def llama_config(shape: str) -> dict:
    hidden, layers, heads, kv_heads, ffn, vocab = LLAMA_SHAPES[shape]
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def build_llama(shape: str, device: str = "cpu", dtype: str = "fp32"):
    """Our LLaMA at `shape`, weights N(0, 0.02), in eval mode."""
    from models.llama import LLaMA, LlamaConfig

    with torch.device(device):
        model = LLaMA(LlamaConfig(**llama_config(shape)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(DTYPES[dtype]).eval()


def llama_forward_vs_transformers(shape: str, size: int, seq: int, repeats: int, tmp: Path) -> dict:
    """LlamaForCausalLM random-init, save_pretrained, loaded by models.load_model: no_grad, eval,
    CPU fp32."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(shape))).eval()
    hf.save_pretrained(tmp)
    ours = models.load_model(tmp)
    vocab = LLAMA_SHAPES[shape][-1]
    ids, mask = batch(size, seq, vocab)
    with torch.no_grad():
        max_diff = (
            (ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits).abs().max().item()
        )
    times = interleaved(
        {
            "ours": torch.no_grad()(lambda: ours(ids, mask)),
            "transformers": torch.no_grad()(lambda: hf(input_ids=ids, attention_mask=mask)),
        },
        repeats,
    )
    return {
        "shape": shape,
        "batch": [size, seq],
        "repeats": repeats,
        "ms": medians_ms(times),
        "ratio": ratio(times, "ours", "transformers"),
        "max_abs_logit_diff": max_diff,
        "attn_implementation": hf.config._attn_implementation,
    }


# --------------------------------------------------------- row 4: peak memory, one process per mode

MODES = ("inference", "mezo", "backprop_adamw", "mezo_paired")  # mezo_paired: zo/paired.py


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def measure_memory(
    mode: str, shape: str, vocab: int, size: int, seq: int, device: str, dtype: str
) -> dict:
    """In this (fresh) process: the peak of one `mode` step after a warm-up, in MiB."""
    cuda = device.startswith("cuda")
    model = build(shape, vocab, device, dtype)
    ids, mask = batch(size, seq, vocab, device)
    loss_fn = lm_loss(ids, mask, paired=mode == "mezo_paired")
    _sync(device)
    post_build = torch.cuda.memory_allocated() / 2**20 if cuda else _status_mib("VmRSS")
    if mode == "inference":

        def run():
            with torch.no_grad():
                loss_fn(model.eval()).item()
    else:
        trainer = (
            MeZO(
                model, MeZOConfig(lr=1e-7, eps=1e-3, perturbation=mode.partition("_")[2] or "exact")
            )
            if mode.startswith("mezo")
            else FO(model, FOConfig(lr=1e-5, optimizer="adam", lr_scheduler="constant"))
        )
        run = lambda: trainer.step(model, loss_fn).item()  # noqa: E731
    run()  # warm-up: compiles the kernels, allocates the Adam state
    _sync(device)
    pre_step = torch.cuda.memory_allocated() / 2**20 if cuda else _status_mib("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    start = time.perf_counter()
    run()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mib("VmHWM")
    return {
        "mode": mode,
        "shape": shape,
        "batch": [size, seq],
        "device": device,
        "dtype": dtype,
        "post_build_MiB": round(post_build, 1),
        "pre_step_MiB": round(pre_step, 1),
        "peak_MiB": round(peak, 1),
        "increase_MiB": round(peak - post_build, 1),
        "step_s": round(seconds, 3),
    }


def memory_in_subprocess(
    mode: str, shape: str, vocab: int, size: int, seq: int, device: str = "cpu", dtype: str = "fp32"
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "memory",
        mode,
        shape,
        str(vocab),
        str(size),
        str(seq),
        device,
        dtype,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark failed ({' '.join(cmd[2:])}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_table(
    shape: str, vocab: int, size: int, seq: int, device: str = "cpu", dtype: str = "fp32"
) -> dict:
    """The three modes at one shape and batch, each in a fresh process; ratios to inference."""
    runs = {
        mode: memory_in_subprocess(mode, shape, vocab, size, seq, device, dtype) for mode in MODES
    }
    inference, mezo = runs["inference"], runs["mezo"]
    # what MeZO's warm-up left beyond inference's
    residue = mezo["pre_step_MiB"] - inference["pre_step_MiB"]
    return {
        "shape": shape,
        "batch": [size, seq],
        "device": device,
        "dtype": dtype,
        "runs": runs,
        "mezo_over_inference": mezo["peak_MiB"] / inference["peak_MiB"],
        "paired_over_inference": runs["mezo_paired"]["peak_MiB"] / inference["peak_MiB"],
        "adamw_over_inference": runs["backprop_adamw"]["peak_MiB"] / inference["peak_MiB"],
        "mezo_warmup_residue_MiB": residue,
        "mezo_over_inference_without_residue": (mezo["peak_MiB"] - residue) / inference["peak_MiB"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="one memory measurement (run by memory_in_subprocess)")
    ap.add_argument("what", choices=["memory"])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("shape", choices=list(SHAPES))
    ap.add_argument("vocab", type=int)
    ap.add_argument("size", type=int)
    ap.add_argument("seq", type=int)
    ap.add_argument("device")
    ap.add_argument("dtype", choices=list(DTYPES))
    a = ap.parse_args()
    print(json.dumps(measure_memory(a.mode, a.shape, a.vocab, a.size, a.seq, a.device, a.dtype)))


if __name__ == "__main__":
    main()
