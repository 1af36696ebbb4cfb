"""Our models against transformers on the same tiny random weights (transformers is the oracle),
over one table of families: OPT's layouts, RoBERTa and the LLaMA family's variants."""

import pytest
import torch

from models import families, load_model
from models.checkpoint import our_name
from tests.helpers.models import (
    LLAMA_LAYOUTS,
    OPT_LAYOUTS,
    hf_as_original,
    hf_llama,
    hf_opt,
    hf_roberta,
    llama_logits,
    padded_batch,
    trainable,
)

LENGTHS = [7, 3, 5, 7]  # rows of different lengths; the full row checks the unpadded case too


def plain_logits(hf, ids, mask):
    return hf(input_ids=ids, attention_mask=mask).logits


# kind -> (oracle: () -> (checkpoint dir, transformers model), its logits, decoder)
FAMILIES = {
    **{k: (lambda k=k: hf_opt(k), plain_logits, True) for k in OPT_LAYOUTS},
    "roberta": (hf_roberta, plain_logits, False),
    **{k: (lambda k=k: hf_llama(k), llama_logits, True) for k in LLAMA_LAYOUTS},
}
DECODERS = [k for k, (_, _, decoder) in FAMILIES.items() if decoder]


def oracle(kind):
    return FAMILIES[kind][0]()


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_fp32_logits_match_transformers(kind, side):
    path, hf = oracle(kind)
    ids, mask = padded_batch(LENGTHS, side)
    ours = load_model(path)(ids, mask)
    ref = FAMILIES[kind][1](hf, ids, mask)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref).abs()[mask.bool()].max() <= 1e-4
    assert torch.isfinite(ours).all()  # fully masked rows of left padding give no NaN


@pytest.mark.parametrize("kind", FAMILIES)
def test_parameter_order_is_the_transformers_models(kind):
    """The original draws one z per parameter in named_parameters() order (large_models/trainer.py
    zo_perturb_parameters), so reference-mode runs need transformers' order: OPT's k, v, q,
    out_proj and project_out before project_in; RoBERTa's head bias first. Names compared through
    the loader's map; the LLaMA family keeps transformers' names and its tie."""
    path, hf = hf_as_original(kind) if kind in [*OPT_LAYOUTS, "roberta"] else oracle(kind)
    model = load_model(path)
    ours = trainable(model)
    assert ours == trainable(hf, lambda name: our_name(hf.config.model_type, name))
    assert families.FAMILIES[model.config.model_type].architecture == type(hf).__name__
    if kind == "opt350":
        assert [n for n, _ in ours[2:4]] == [
            "decoder.project_out.weight",
            "decoder.project_in.weight",
        ]
    if kind == "roberta":  # the tied decoder weight is listed once, under the word embeddings
        assert [n for n, _ in ours[-5:-3]] == ["lm_head.decoder.bias", "lm_head.dense.weight"]
    if kind in LLAMA_LAYOUTS:
        tied = LLAMA_LAYOUTS[kind]["tie_word_embeddings"]  # re-tied after assign=True loading
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("kind", DECODERS)
@torch.no_grad()
def test_greedy_generation_matches_transformers(kind):
    path, hf = oracle(kind)
    ids, mask = padded_batch([6, 2, 4], "left", seed=3)
    got = load_model(path).generate(ids, mask, max_new_tokens=10, eos_token_ids=())
    assert torch.equal(got, greedy(hf, ids, mask, None))


@pytest.mark.parametrize("kind", ["opt125", "opt350", "roberta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_runs_and_stays_close(kind, dtype):
    path, hf = oracle(kind)
    ids, mask = padded_batch(LENGTHS, "left")
    ours = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    logits = ours(ids, mask)
    assert logits.dtype == dtype
    ref = hf(input_ids=ids, attention_mask=mask).logits
    ref_low = (
        type(hf)
        .from_pretrained(path, dtype=dtype)
        .eval()(input_ids=ids, attention_mask=mask)
        .logits
    )
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


def greedy(hf, ids, mask, eos):
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=1,
        eos_token_id=eos,
    )
    return out[:, ids.shape[1] :]


@torch.no_grad()
def test_greedy_generation_stops_per_row_like_transformers():
    path, hf = hf_opt("opt125")
    ids, mask = padded_batch([6, 2, 4], "left", seed=3)
    free = greedy(hf, ids, mask, None)
    eos = [int(free[1, 0]), int(free[0, 3])]  # row 1 stops at once, row 0 a few tokens later
    ref = greedy(hf, ids, mask, eos)
    got = load_model(path).generate(ids, mask, max_new_tokens=10, eos_token_ids=eos)
    assert torch.equal(got, ref)
    assert (got[1, 1:] == 1).all()  # a stopped row keeps its stop token, then pad id


def perturb_by_hooks(model, delta):
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

    path, _ = oracle(kind.split("-")[0])
    ids, mask = padded_batch(LENGTHS, "left")
    g = torch.Generator().manual_seed(0)

    def build():
        model = load_model(path)
        if kind.endswith("lora-prefix"):
            apply_prefix(
                apply_lora(model, generator=torch.Generator().manual_seed(1)),
                generator=torch.Generator().manual_seed(2),
            )
        return model

    hooked, moved = build(), build()
    # tied: one entry
    delta = {p: 0.01 * torch.randn(p.shape, generator=g) for p in hooked.parameters()}
    for p, q in zip(hooked.parameters(), moved.parameters()):
        q.add_(delta[p])
    handles = perturb_by_hooks(hooked, delta)
    assert (hooked(ids, mask) - moved(ids, mask)).abs()[mask.bool()].max() <= 1e-5
    if kind.startswith("opt"):
        assert torch.equal(hooked.generate(ids, mask, 5, ()), moved.generate(ids, mask, 5, ()))
    for h in handles:
        h.remove()
    assert all(isinstance(p, torch.nn.Parameter) for p in hooked.parameters())
