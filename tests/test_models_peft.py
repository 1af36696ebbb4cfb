"""LoRA and prefix tuning: direct formulas, transformers fed explicit prefix key/values,
generation."""

import re

import pytest
import torch
from safetensors.torch import save_file

from models import (
    TINY_OPT,
    ModelError,
    adapter_state_dict,
    apply_adapter,
    apply_lora,
    apply_prefix,
    base_fingerprints,
    load_adapter,
    load_model,
    read_adapter,
)
from models.checkpoint import our_name
from models.identity import check_base
from tests.helpers.models import (
    hf_as_original,
    hf_opt,
    hf_roberta,
    original_lora,
    original_prefix,
    padded_batch,
    trainable,
)

KINDS = ["opt125", "opt350", "roberta"]


def _oracle(kind):
    return hf_roberta() if kind == "roberta" else hf_opt(kind)


def _batch(kind):
    return padded_batch([7, 3, 5], "right" if kind == "roberta" else "left")


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["opt125", "roberta"])
@torch.no_grad()
def test_lora_starts_as_the_base_model_and_trains_only_lora(kind):
    path, _ = _oracle(kind)
    ids, mask = _batch(kind)
    base = load_model(path)(ids, mask)
    model = apply_lora(load_model(path), r=8, alpha=16)
    assert torch.equal(model(ids, mask), base)  # B = 0
    targets = ("q_proj", "v_proj") if kind != "roberta" else ("query", "value")
    expected = sorted(
        f"{attn}.{t}.{ab}"
        for attn, m in model.named_modules()
        if hasattr(m, "lora_targets")
        for t in targets
        for ab in ("lora_A", "lora_B")
    )
    assert _trainable(model) == expected and len(expected) == 2 * 2 * 2
    a = model.get_submodule(expected[0].rpartition(".")[0]).lora_A
    # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in))
    assert a.shape == (8, 64) and a.abs().max() <= 64**-0.5
    assert a.abs().max() > 0.8 * 64**-0.5


@torch.no_grad()
def test_lora_forward_equals_merged_weight_formula():
    path, _ = hf_opt()
    ids, mask = _batch("opt125")
    model = apply_lora(load_model(path), r=8, alpha=16)
    merged = load_model(path)
    for name, module in model.named_modules():
        if hasattr(module, "lora_B"):
            module.lora_B.normal_()
            # (W + (alpha/r) B A) x + b
            w = module.weight + (16 / 8) * module.lora_B @ module.lora_A
            merged.get_submodule(name).weight.copy_(w)
            x = torch.randn(3, 64)
            assert torch.allclose(module(x), x @ w.T + module.bias, atol=1e-5)
    assert (model(ids, mask) - merged(ids, mask)).abs()[mask.bool()].max() <= 1e-4
    assert not torch.equal(model(ids, mask), load_model(path)(ids, mask))


def _transformers_with_prefix(hf, model, ids, mask, kind):
    """transformers' logits with our prefix fed as past key/values, real-token positions given
    explicitly."""
    from transformers import DynamicCache

    B, P, H = ids.shape[0], 5, 4
    cache = DynamicCache(config=hf.config)
    for i, attn in enumerate(m for m in model.modules() if hasattr(m, "prefix_keys")):
        k, v = (
            t.detach().view(1, P, H, -1).transpose(1, 2).expand(B, -1, -1, -1)
            for t in (attn.prefix_keys, attn.prefix_values)
        )
        cache.update(k, v, i)
    if kind == "roberta":
        real = (ids != 1).long()
        positions = real.cumsum(1) * real + 1
    else:
        positions = mask.cumsum(1) * mask - 1
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1)
    return hf(
        input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache
    ).logits


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_prefix_matches_transformers_fed_the_prefix_as_past_key_values(kind):
    path, hf = _oracle(kind)
    ids, mask = _batch(kind)
    model = apply_prefix(load_model(path), num_prefix=5, generator=torch.Generator().manual_seed(0))
    assert all(n.endswith(("prefix_keys", "prefix_values")) for n in _trainable(model))
    assert len(_trainable(model)) == 2 * 2
    ours = model(ids, mask)
    ref = _transformers_with_prefix(hf, model, ids, mask, kind)
    assert (ours - ref).abs()[mask.bool()].max() <= 1e-4
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("kind", ["opt350", "roberta"])
@torch.no_grad()
def test_prefix_init_is_the_key_value_projection_of_random_tokens(kind):
    path, hf = _oracle(kind)
    model = apply_prefix(load_model(path), num_prefix=5, generator=torch.Generator().manual_seed(7))
    tokens = torch.randint(
        0, hf.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(7)
    )
    names = ("key", "value") if kind == "roberta" else ("k_proj", "v_proj")
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
        for n, m in hf.named_modules()
        if n.endswith(names)
    ]
    hf(input_ids=tokens)  # no BOS, as MeZO's prefix.py does
    for h in hooks:
        h.remove()
    ours = [
        t
        for m in model.modules()
        if hasattr(m, "prefix_keys")
        for t in (m.prefix_keys, m.prefix_values)
    ]
    assert len(ours) == len(seen) == 4
    for a, b in zip(ours, seen):
        assert a.shape == (5, 64) and torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_prefix_generation_with_cache_equals_recomputing_without_cache():
    """Cached decoding with a prefix must not shift positions by num_prefix (the original's bug,
    10.6)."""
    path, _ = hf_opt()
    model = apply_prefix(load_model(path), num_prefix=5, generator=torch.Generator().manual_seed(0))
    ids, mask = padded_batch([6, 2, 4], "left", seed=3)
    seq, full = ids, mask
    for _ in range(8):  # reference: the whole sequence again at every step, positions from the mask
        nxt = model(seq, full)[:, -1].argmax(-1, keepdim=True)
        seq, full = torch.cat([seq, nxt], 1), torch.cat([full, torch.ones_like(nxt)], 1)
    assert torch.equal(
        model.generate(ids, mask, max_new_tokens=8, eos_token_ids=()), seq[:, ids.shape[1] :]
    )


@torch.no_grad()
def test_adapter_state_dict_round_trip():
    path, _ = hf_opt()
    ids, mask = _batch("opt125")
    trained = apply_prefix(apply_lora(load_model(path)), generator=torch.Generator().manual_seed(0))
    for p in trained.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p))
    state = adapter_state_dict(trained)
    assert len(state) == 2 * (4 + 2)
    fresh = apply_prefix(apply_lora(load_model(path)), generator=torch.Generator().manual_seed(1))
    assert torch.equal(load_adapter(fresh, state)(ids, mask), trained(ids, mask))
    with pytest.raises(ModelError, match="adapter"):
        load_adapter(apply_lora(load_model(path)), state)


def _all_parameters(model, rename=lambda name: name):
    return [(rename(n), tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_parameter_order_is_the_originals(kind):
    """large_models/lora.py on the transformers model: v_proj's adapter before q_proj's (OPT
    registers
    k, v, q), and inside each wrapped projection the frozen weight, bias, then lora_A, lora_B."""
    path, hf = hf_as_original(kind)
    rename = lambda name: our_name(hf.config.model_type, name)  # noqa: E731
    ours = apply_lora(load_model(path), r=8, alpha=16)
    assert _all_parameters(ours) == _all_parameters(original_lora(hf, r=8, alpha=16), rename)
    if kind != "roberta":
        assert [n.removeprefix("decoder.layers.0.") for n, _ in trainable(ours)[:4]] == [
            "self_attn.v_proj.lora_A",
            "self_attn.v_proj.lora_B",
            "self_attn.q_proj.lora_A",
            "self_attn.q_proj.lora_B",
        ]


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_parameter_order_is_the_originals(kind):
    """The original's prefix.py adds prefix_keys then prefix_values to each attention module, so
    they come before its projections. RoBERTa's live one level down here (`attention.self`, the
    module that
    attends) where medium_models/src/prefix.py puts them on `attention`: same order, other names."""
    path, hf = hf_as_original(kind)
    rename = lambda name: our_name(hf.config.model_type, name).replace(  # noqa: E731
        ".attention.prefix_", ".attention.self.prefix_"
    )
    ours = apply_prefix(load_model(path), num_prefix=5, generator=torch.Generator().manual_seed(0))
    assert _all_parameters(ours) == _all_parameters(original_prefix(hf, num_prefix=5), rename)
    assert [n.rsplit(".", 1)[-1] for n, _ in trainable(ours)] == [
        "prefix_keys",
        "prefix_values",
    ] * 2


# ---------------------------------------------------------------- adapter files


def _adapter(tmp_path, model, meta, mode="lora", change=None):
    """An adapter file of `model` (LoRA or prefix applied here) with `meta` as its metadata."""
    apply_lora(model) if mode == "lora" else apply_prefix(model, num_prefix=5)
    tensors = adapter_state_dict(model)
    if change:
        change(tensors)
    meta = {"mode": mode, "lora_r": "8", "lora_alpha": "16.0", "num_prefix": "5", **meta}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    return tmp_path / "a.safetensors"


def _first_lora_a(tensors):
    name = next(n for n in tensors if n.endswith("lora_A"))
    tensors[name] = tensors[name][:4].clone()


BAD_METADATA = [
    ({"lora_alpha": "nan"}, "lora", None, "lora_alpha nan"),
    ({"lora_alpha": "-inf"}, "lora", None, "lora_alpha -inf"),
    ({"lora_alpha": "0"}, "lora", None, "lora_alpha 0"),
    ({"lora_r": "-4"}, "lora", None, "lora_r -4"),
    ({"lora_r": "2.5"}, "lora", None, "lora_r 2.5, expected an integer > 0"),
    ({"lora_r": str(10**12)}, "lora", None, f"lora_r {10**12}, the tensors' rank is 8"),
    ({}, "lora", _first_lora_a, "lora_r 8, the tensors' rank is 4"),
    ({"num_prefix": str(10**12)}, "prefix", None, f"num_prefix {10**12}, the tensors hold 5"),
    ({"mode": "lora"}, "prefix", None, "is not a lora tensor"),
]


@pytest.mark.parametrize(
    "meta, mode, change, what", BAD_METADATA, ids=[what for *_, what in BAD_METADATA]
)
def test_read_adapter_refuses_metadata_its_tensors_do_not_bear_out(
    tmp_path, meta, mode, change, what
):
    path = _adapter(tmp_path, load_model(TINY_OPT), meta, mode, change)
    with pytest.raises(ModelError, match=rf"{re.escape(what)}.*\({re.escape(str(path))}\)$"):
        read_adapter(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_read_adapter_refuses_tensors_of_a_non_floating_dtype(tmp_path, dtype):
    def cast(tensors):
        for name in tensors:
            tensors[name] = tensors[name].to(dtype)

    path = _adapter(tmp_path, load_model(TINY_OPT), {}, change=cast)
    with pytest.raises(ModelError, match=rf"dtype {str(dtype)[6:]}, expected a floating-point"):
        read_adapter(path)


def test_an_adapter_checks_its_base_in_every_dtype_that_can_tell():
    """Trained in bf16: an fp32 model casts to bf16 and matches; an fp16 model cannot tell."""
    record = base_fingerprints(load_model(TINY_OPT, dtype=torch.bfloat16))
    assert list(record) == ["base_fingerprint.bfloat16"]
    assert len(base_fingerprints(load_model(TINY_OPT))) == 3  # fp32 determines all three
    check_base(load_model(TINY_OPT), record, "a.safetensors")
    check_base(load_model(TINY_OPT, dtype=torch.bfloat16), record, "a.safetensors")
    check_base(load_model(TINY_OPT, dtype=torch.float16), {}, "a.safetensors")  # an older adapter
    with pytest.raises(ModelError, match=r"evaluate in bfloat16 or float32 \(a.safetensors\)$"):
        check_base(load_model(TINY_OPT, dtype=torch.float16), record, "a.safetensors")
    other = load_model(TINY_OPT)
    with torch.no_grad():
        other.decoder.final_layer_norm.bias.add_(1.0)
    with pytest.raises(ModelError, match=r"trained on other base weights .*\(a.safetensors\)$"):
        check_base(other, record, "a.safetensors")


def test_an_adapter_without_a_recorded_base_still_applies(tmp_path):
    """Adapters written before the base was recorded load as before, unchecked."""
    trained = load_model(TINY_OPT)
    path = _adapter(tmp_path, trained, {})
    model = apply_adapter(load_model(TINY_OPT), path)
    assert all(
        torch.equal(p, adapter_state_dict(trained)[n]) for n, p in adapter_state_dict(model).items()
    )
