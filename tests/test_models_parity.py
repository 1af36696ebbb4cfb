"""Our OPT / RoBERTa against transformers on the same tiny random weights (transformers is the oracle)."""
import pytest
import torch

from models import load_model
from models.checkpoint import _our_name
from tests.helpers_models import OPT_LAYOUTS, hf_as_original, hf_opt, hf_roberta, padded_batch, trainable

LENGTHS = [7, 3, 5, 7]  # rows of different lengths; the full row checks the unpadded case too


def _oracle(kind):
    return hf_roberta() if kind == "roberta" else hf_opt(kind)


@pytest.mark.parametrize("kind", [*OPT_LAYOUTS, "roberta"])
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_fp32_logits_match_transformers(kind, side):
    path, hf = _oracle(kind)
    ids, mask = padded_batch(LENGTHS, side)
    ours = load_model(path)(ids, mask)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref).abs()[mask.bool()].max() <= 1e-4
    assert torch.isfinite(ours).all()  # fully masked rows of left padding give no NaN


@pytest.mark.parametrize("kind", [*OPT_LAYOUTS, "roberta"])
def test_parameter_order_is_the_transformers_models(kind):
    """The original draws one z per parameter in named_parameters() order (large_models/trainer.py
    zo_perturb_parameters), so reference-mode runs need transformers' order: OPT's k, v, q, out_proj and
    project_out before project_in; RoBERTa's head bias first. Names compared through the loader's map."""
    path, hf = hf_as_original(kind)
    ours = trainable(load_model(path))
    assert ours == trainable(hf, lambda name: _our_name(hf.config.model_type, name))
    if kind == "opt350":
        assert [n for n, _ in ours[2:4]] == ["decoder.project_out.weight", "decoder.project_in.weight"]
    if kind == "roberta":  # the tied decoder weight is listed once, under the word embeddings
        assert [n for n, _ in ours[-5:-3]] == ["lm_head.decoder.bias", "lm_head.dense.weight"]


@pytest.mark.parametrize("kind", ["opt125", "opt350", "roberta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_runs_and_stays_close(kind, dtype):
    path, hf = _oracle(kind)
    ids, mask = padded_batch(LENGTHS, "left")
    ours = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    logits = ours(ids, mask)
    assert logits.dtype == dtype
    ref = hf(input_ids=ids, attention_mask=mask).logits
    ref_low = type(hf).from_pretrained(path, dtype=dtype).eval()(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    scale = ref.abs().max()
    assert (logits.float() - ref).abs()[m].max() <= 0.02 * scale
    assert (logits.float() - ref_low.float()).abs()[m].max() <= 0.005 * scale


def test_token_type_ids_default_to_zero():
    path, hf = hf_roberta()
    ids, mask = padded_batch(LENGTHS, "right")
    model = load_model(path)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), model(ids, mask, token_type_ids=torch.zeros_like(ids)))


def test_dropout_only_in_train_mode():
    path, _ = hf_opt()
    model = load_model(path)
    ids, mask = padded_batch(LENGTHS, "left")
    assert torch.equal(model(ids, mask), model(ids, mask))  # load_model returns eval mode
    torch.manual_seed(0)
    assert not torch.equal(model.train()(ids, mask), model.eval()(ids, mask))


def _greedy(hf, ids, mask, eos):
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                      pad_token_id=1, eos_token_id=eos)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("layout", ["opt125", "opt350"])
@torch.no_grad()
def test_greedy_generation_matches_transformers(layout):
    path, hf = hf_opt(layout)
    ids, mask = padded_batch([6, 2, 4], "left", seed=3)
    got = load_model(path).generate(ids, mask, max_new_tokens=10, eos_token_ids=())
    assert torch.equal(got, _greedy(hf, ids, mask, None))


@torch.no_grad()
def test_greedy_generation_stops_per_row_like_transformers():
    path, hf = hf_opt("opt125")
    ids, mask = padded_batch([6, 2, 4], "left", seed=3)
    free = _greedy(hf, ids, mask, None)
    eos = [int(free[1, 0]), int(free[0, 3])]  # row 1 stops at once, row 0 a few tokens later
    ref = _greedy(hf, ids, mask, eos)
    got = load_model(path).generate(ids, mask, max_new_tokens=10, eos_token_ids=eos)
    assert torch.equal(got, ref)
    assert (got[1, 1:] == 1).all()  # a stopped row keeps its stop token, then pad id


def _perturb_by_hooks(model, delta):
    """What zo/ does: a forward-pre-hook swaps each directly owned parameter for p + delta[p] and a
    forward hook puts it back. Works only if every parameter is used inside its owner's forward."""
    handles = []
    for module in model.modules():
        if not any(p is not None for p in module._parameters.values()):
            continue

        def swap(mod, args, kwargs=None):
            mod._kept = dict(mod._parameters)
            for name, p in mod._kept.items():
                if p is not None:
                    mod._parameters[name] = p + delta[p]

        def restore(mod, args, out):
            mod._parameters.update(mod._kept)
        handles += [module.register_forward_pre_hook(swap), module.register_forward_hook(restore)]
    return handles


@pytest.mark.parametrize("kind", ["opt350", "roberta", "opt125-lora-prefix"])
@torch.no_grad()
def test_every_parameter_is_used_inside_its_owners_forward(kind):
    from models import apply_lora, apply_prefix
    path, _ = _oracle(kind.split("-")[0])
    ids, mask = padded_batch(LENGTHS, "left")
    g = torch.Generator().manual_seed(0)

    def build():
        model = load_model(path)
        if kind.endswith("lora-prefix"):
            apply_prefix(apply_lora(model, generator=torch.Generator().manual_seed(1)),
                         generator=torch.Generator().manual_seed(2))
        return model
    hooked, moved = build(), build()
    delta = {p: 0.01 * torch.randn(p.shape, generator=g) for p in hooked.parameters()}  # tied: one entry
    for p, q in zip(hooked.parameters(), moved.parameters()):
        q.add_(delta[p])
    handles = _perturb_by_hooks(hooked, delta)
    assert (hooked(ids, mask) - moved(ids, mask)).abs()[mask.bool()].max() <= 1e-5
    if kind.startswith("opt"):
        assert torch.equal(hooked.generate(ids, mask, 5, ()), moved.generate(ids, mask, 5, ()))
    for h in handles:
        h.remove()
    assert all(isinstance(p, torch.nn.Parameter) for p in hooked.parameters())
