"""Shared-prompt scoring (data/collate.py `shared_rows`) against the original's one sequence per
candidate, `logits_to_keep` against slicing the full logits, and evaluation batches taken shortest
first,
on the tiny parity models."""

import dataclasses

import pytest
import torch

import data
import models
from data import evaluate
from data.collate import split_prompt
from data.evaluate import encode_samples, predict
from models import load_model, load_tokenizer
from tests.helpers.models import (
    LLAMA_LAYOUTS,
    OPT_LAYOUTS,
    hf_llama,
    hf_opt,
    hf_roberta,
    padded_batch,
    tiny_llama_dir,
)

CLASSIFICATION = [name for name, task in data.OPT_TASKS.items() if not task.generation]

# Shared and per-candidate rows compute the same function of the weights; only the order of fp
# additions differs (another number of padded keys in each softmax, other matmul shapes). In float64
# a reordered sum of n terms moves by at most n * u * sum|terms| (u = 1.1e-16): with n <= 1500 (the
# vocabulary of the log-softmax; the blocks' sums are shorter), sums of |terms| <= 1e2 for these
# tiny random models, and 2 blocks + the head compounding it, <= 3 * 1500 * 1.1e-16 * 1e2 = 5e-11.
FP64_BOUND = 5e-11


@pytest.fixture(scope="module")
def tiny():
    """{family: (model in float64, its tokenizer)}: the embedded tiny OPT and a tiny Qwen2 (LLaMA
    family)."""
    out = {}
    for family, path in (("opt", models.TINY_OPT), ("llama", str(tiny_llama_dir()))):
        out[family] = load_model(path).eval(), load_tokenizer(path)
    return out


# ---------------------------------------------------------------- logits only where they are read


@pytest.mark.parametrize(
    "path",
    [lambda: hf_opt(layout)[0] for layout in OPT_LAYOUTS]
    + [lambda: hf_llama(layout)[0] for layout in LLAMA_LAYOUTS],
    ids=[*OPT_LAYOUTS, *LLAMA_LAYOUTS],
)
@torch.no_grad()
def test_kept_logits_equal_slices_of_the_full_logits_bitwise(path):
    """The LM head is row-wise (each logit is one dot product of one position's hidden state), so
    keeping fewer rows changes no number as long as the matmul's per-row reduction does not depend
    on how many rows it gets; on CPU fp32 it does not for these shapes (a GPU kernel may choose
    another
    split-K for another row count, so there equality holds within rounding only)."""
    model = load_model(path()).eval()
    ids, mask = padded_batch([7, 3, 5, 6], "left")
    full = model(ids, mask)
    assert torch.equal(model(ids, mask, logits_to_keep=3), full[:, -3:])
    assert torch.equal(model(ids, mask, logits_to_keep=0), full)
    at = torch.tensor([0, 4, 6])
    assert torch.equal(model(ids, mask, logits_to_keep=at), full[:, at])
    per_row = torch.tensor([[6], [4], [5], [6]])
    assert torch.equal(
        model(ids, mask, logits_to_keep=per_row), full[torch.arange(4)[:, None], per_row]
    )


@torch.no_grad()
def test_roberta_keeps_the_mask_positions_bitwise():
    model = load_model(hf_roberta()[0]).eval()
    ids, mask = padded_batch([7, 3, 5, 6], "right")
    full = model(ids, mask)
    mask_pos = torch.tensor([[3], [1], [4], [0]])
    assert torch.equal(
        model(ids, mask, logits_to_keep=mask_pos), full[torch.arange(4)[:, None], mask_pos]
    )


def test_a_block_mask_needs_position_ids():
    model = load_model(models.TINY_OPT)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(models.ModelError, match="position_ids"):
        model(ids, torch.ones(1, 1, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------- shared prompt = per candidate


def _scores(model, encoded, pad_token_id, shared):
    batch = data.collate(encoded, "classification", pad_token_id, shared=shared)
    with torch.no_grad():
        return data.candidate_scores(data.batch_logits(model, batch), batch), batch


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("task_name", CLASSIFICATION)
def test_shared_prompt_scores_equal_per_candidate_scores_in_fp64(tiny, family, task_name):
    model, tok = tiny[family]
    model = model.double()
    task = data.get_task(task_name, family=family)
    encoded = encode_samples(task, task.load(None)["valid"][:16], tok, max_length=512)
    per, per_batch = _scores(model, encoded, tok.pad_token_id, shared=False)
    shared, batch = _scores(model, encoded, tok.pad_token_id, shared=True)
    assert batch["input_ids"].shape[0] == len(encoded) < per_batch["input_ids"].shape[0]
    assert batch["input_ids"].numel() < per_batch["input_ids"].numel()  # fewer positions computed
    # a block mask only where a candidate has more than one token after the shared prompt
    packed = any(
        len(rest) > 1 for e in encoded for rest in split_prompt(e.input_ids, e.option_len)[1]
    )
    assert ("position_ids" in batch) == packed
    assert torch.isfinite(per).any(1).all()
    assert (shared - per).nan_to_num(posinf=0, neginf=0).abs().max() <= FP64_BOUND
    assert torch.equal(shared.isinf(), per.isinf())
    model.float()


def _random_examples(gen, vocab, count=6):
    """Prompts of 1..8 tokens and 1..3 candidates whose rests (1..4 tokens) hold 1..len option
    tokens (so some rests start with non-option tokens); the last example shares no prefix at
    all."""
    out = []
    for i in range(count):
        prompt = torch.randint(
            5, vocab, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen
        ).tolist()
        if i == count - 1:
            prompt = []
        seqs, lens = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            rest = torch.randint(
                5,
                vocab,
                (int(torch.randint(2 if not prompt else 1, 5, (1,), generator=gen)),),
                generator=gen,
            ).tolist()
            seqs.append(prompt + rest)
            lens.append(
                int(torch.randint(1, len(rest) + (1 if prompt else 0), (1,), generator=gen))
            )
        out.append(data.Encoded(seqs, lens, correct=[0]))
    return out


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_packed_rows_score_any_split_of_prompt_and_candidates(tiny, family):
    model, tok = tiny[family]
    model = model.double()
    encoded = _random_examples(torch.Generator().manual_seed(0), vocab=model.config.vocab_size)
    per, _ = _scores(model, encoded, tok.pad_token_id, shared=False)
    shared, batch = _scores(model, encoded, tok.pad_token_id, shared=True)
    assert "position_ids" in batch and batch["input_ids"].shape[0] == len(encoded)
    assert (shared - per).nan_to_num(posinf=0, neginf=0).abs().max() <= FP64_BOUND
    assert torch.equal(shared.isinf(), per.isinf())
    model.float()


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("task_name", CLASSIFICATION)
def test_predictions_are_identical_on_every_bundled_evaluation_row(tiny, family, task_name):
    """fp32, the way eval.py scores: zero-shot, and for SST-2 also SFC and 4-shot ICL."""
    model, tok = tiny[family]
    task = data.get_task(task_name, family=family)
    splits = task.load(None)
    runs = [(splits["valid"], {})]
    if task_name == "SST2":
        test, demos = data.icl_splits(splits, num_demos=4, num_eval=None)
        runs += [(splits["valid"], dict(sfc=True)), (test, dict(demo_sets=demos))]
    for samples, options in runs:
        got = {
            shared: predict(
                model, tok, task, samples, batch_size=16, max_length=512, shared=shared, **options
            )[0]
            for shared in (True, False)
        }
        assert got[True] == got[False], options


# --------------------------------------------------------------- evaluation batches, shortest first


def test_evaluation_batches_rows_by_length_and_predicts_and_weighs_as_in_file_order(
    tiny, monkeypatch
):
    """predict and dev_loss take rows shortest first (less padding), and give back each row's own
    prediction in file order: the same as one row at a time (no padding at all). dev_loss does too
    when examples have different numbers of candidates, and still weighs each of the original's
    file-order batches by its rows."""
    model, tok = tiny["llama"]
    task = data.get_task("SST2", family="llama")
    samples = task.load(None)["valid"]
    widths, options = [], []
    real_batch_logits = evaluate.batch_logits
    monkeypatch.setattr(
        evaluate,
        "batch_logits",
        lambda m, b: (
            widths.append(b["input_ids"].shape[1])
            or options.append(b["num_options"].tolist())
            or real_batch_logits(m, b)
        ),
    )
    batched = predict(model, tok, task, samples, batch_size=16, max_length=512)
    assert widths == sorted(widths) and len(widths) == -(-len(samples) // 16)
    encoded = encode_samples(task, samples, tok, max_length=512)
    lengths = [len(e.input_ids[0]) for e in encoded]
    file_order = sum(-(-max(lengths[i : i + 16]) // 8) * 8 for i in range(0, len(lengths), 16))
    assert sum(widths) < file_order  # the sample's rows vary in length: sorting must pad less
    widths.clear()
    one_by_one = predict(model, tok, task, samples, batch_size=1, max_length=512)
    assert batched == one_by_one and len(widths) == len(samples)

    # only fp32 rounding differs (a reordered sum of 120 losses < 1, other padded shapes): ~1e-7
    # relative each
    assert evaluate.dev_loss(model, encoded, "classification", tok.pad_token_id, 16)[
        "loss"
    ] == pytest.approx(
        evaluate.dev_loss(model, encoded, "classification", tok.pad_token_id, 1)["loss"], rel=1e-5
    )
    mixed = sorted(encoded[:6], key=lambda e: -len(e.input_ids[0]))  # longest first in file order
    mixed[0] = dataclasses.replace(
        mixed[0], input_ids=mixed[0].input_ids[:1], option_len=mixed[0].option_len[:1], correct=[0]
    )
    assert len(mixed[0].input_ids[0]) > len(mixed[-1].input_ids[0])  # sorting would move it last
    options.clear()
    ours = evaluate.dev_loss(model, mixed, "classification", tok.pad_token_id, 2)["loss"]
    assert options[0] != [1, 2]  # shortest first, though the rows' weights depend on the grouping
    expected = hf_evaluation_loss(model, mixed, "classification", tok.pad_token_id, 2)
    assert ours == pytest.approx(expected, rel=8 * torch.finfo(torch.float32).eps)


def hf_evaluation_loss(model, encoded, kind, pad_token_id, batch_size):
    """HF Trainer.evaluation_loop over the original's batches, transcribed: `batch_size` examples
    in file order, each batch's mean loss repeated once per row (candidates for the
    classification loss, examples otherwise), then the mean."""
    scored = kind == "classification" or encoded[0].gold is None
    repeated = []
    with torch.no_grad():
        for group in evaluate.chunks(encoded, batch_size):
            batch = data.collate(group, "classification" if scored else kind, pad_token_id)
            logits = data.batch_logits(model, batch)
            loss = data.option_lm_loss if kind == "option_lm" else data.task_loss
            rows = int(batch["num_options"].sum()) if kind == "classification" else len(group)
            repeated.append(loss(logits, batch).repeat(rows))
    return torch.cat(repeated).mean().item()


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize(
    "task_name, kind",
    [
        ("SST2", "classification"),
        ("CB", "option_lm"),
        ("Copa", "classification"),
        ("Copa", "option_lm"),
        ("ReCoRD", "option_lm"),
        ("SQuAD", "option_lm"),
    ],
)
def test_dev_loss_is_the_originals_over_its_file_order_batches(tiny, task_name, kind, batch_size):
    """The batches run shortest first, yet the loss is the original's: its batches are file-order
    groups whose token-level (option LM) or row-weighted loss depends on which examples share
    them, and the answers differ in length. Only fp32 rounding differs: each batch's loss sums the
    same per-example terms in another order (within a few ulp per term) and the mean of
    nonnegative batch losses keeps that relative bound."""
    model, tok = tiny["opt"]
    model = model.float()
    task = data.get_task(task_name, family="opt")
    samples = task.load(None)["valid"][:24]
    encoded = encode_samples(task, samples, tok, generation_with_gold=True, max_length=512)
    # the answers (multi-token tasks) or the number of candidates (ReCoRD) differ
    varied = len({tuple(e.option_len) for e in encoded}) > 1
    assert varied == (task_name in ("Copa", "ReCoRD", "SQuAD"))
    ours = evaluate.dev_loss(model, encoded, kind, tok.pad_token_id, batch_size)["loss"]
    expected = hf_evaluation_loss(model, encoded, kind, tok.pad_token_id, batch_size)
    terms = batch_size * max(len(e.input_ids) for e in encoded)  # candidates of one batch
    assert ours == pytest.approx(expected, rel=4 * terms * torch.finfo(torch.float32).eps, abs=0)


def test_a_loss_refuses_logits_of_every_position():
    """A model run without the batch's logits_to_keep returns [N, T, V]: the losses would read the
    wrong positions without an error."""
    model, tok = load_model(models.TINY_OPT).eval(), load_tokenizer(models.TINY_OPT)
    task = data.get_task("Copa", family="opt")
    encoded = encode_samples(task, task.load(None)["valid"][:2], tok)
    batch = data.collate(encoded, "classification", tok.pad_token_id)
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"])
    for loss in (data.task_loss, data.option_lm_loss, data.candidate_scores):
        with pytest.raises(data.DataError, match="logits of .* positions where the batch reads"):
            loss(full, batch)
