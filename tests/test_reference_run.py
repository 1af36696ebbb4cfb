"""`perturbation="reference"` reproduces the original's run, step for step, bitwise.

The original's MeZO step (large_models/trainer.py `zo_step`, `zo_perturb_parameters`, `zo_update`)
is transcribed once in tests/helpers/original.py and run on transformers' OPTForCausalLM /
RobertaForMaskedLM, its LoRA by large_models/lora.py's wrapping. Ours runs zo.MeZO in reference mode
on our models loaded from the same checkpoint, with the same numpy seed stream, batches and loss.
Both forwards give bitwise-equal logits in fp32 on CPU, so any difference comes from the step: the
order z is drawn in (named_parameters()), the arithmetic, or the weight-decay exemptions.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zo
from models import apply_lora, load_model
from models.checkpoint import our_name
from tests.helpers.models import hf_as_original, original_lora, padded_batch
from tests.helpers.original import OriginalStep

STEPS = 5
SEED = 42  # HF set_seed(42) seeds numpy's global RNG in the original's Trainer
SETTINGS = {
    "ft": dict(lr=1e-3, eps=1e-3, weight_decay=0.1),
    "lora": dict(lr=1e-2, eps=1e-2, weight_decay=0.1),
}
# Weight decay: large_models/trainer.py zo_update (OPT) exempts names containing "bias",
# "layer_norm" or "layernorm"; medium_models/src/trainer.py (RoBERTa) decays every parameter.
WD_EXEMPT = {"opt": ("bias", "layer_norm", "layernorm"), "roberta": ()}


def lm_loss(logits, ids, mask):
    """Mean next-token cross-entropy where both tokens are real (logits at pads are not comparable):
    one fixed scalar of the logits for both sides."""
    target = ids[:, 1:].masked_fill((mask[:, 1:] * mask[:, :-1]) == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)


def _batches(kind):
    side = "right" if kind == "roberta" else "left"
    return [padded_batch([7, 3, 5, 6], side, seed=100 + step) for step in range(STEPS)]


def _weights(model, rename=lambda name: name):
    return {rename(n): p.detach().clone() for n, p in model.named_parameters()}


def _run_original(model, batches, rename, settings):
    step = OriginalStep(
        settings["lr"],
        settings["eps"],
        settings["weight_decay"],
        medium_models=model.config.model_type == "roberta",
    )
    loss_fns = [
        lambda m, ids=ids, mask=mask: lm_loss(
            m(input_ids=ids, attention_mask=mask).logits, ids, mask
        )
        for ids, mask in batches
    ]
    return [
        (step.zo_random_seed, step.projected_grad, _weights(model, rename))
        for _ in step.run(model, loss_fns, SEED)
    ]


def _run_ours(model, batches, settings):
    cfg = zo.MeZOConfig(
        **settings,
        wd_exempt=WD_EXEMPT[model.config.model_type],
        perturbation="reference",
        seed=SEED,
        seed_source="numpy_global",
    )
    mezo, trace = zo.MeZO(model, cfg), []
    for ids, mask in batches:
        mezo.zo_step(model, lambda m: lm_loss(m(ids, mask), ids, mask))
        mezo.zo_update(model)
        trace.append((mezo.zo_random_seed, float(mezo.projected_grad), _weights(model)))
    return trace


def _models(kind, mode):
    """(transformers model as the original set it up, ours) from one checkpoint, same adapter
    values."""
    path, hf = hf_as_original(kind)
    ours = load_model(path)
    rename = lambda name: our_name(hf.config.model_type, name)  # noqa: E731 (HF name -> ours)
    if mode == "lora":
        original_lora(hf, r=8, alpha=16)
        apply_lora(ours, r=8, alpha=16, generator=torch.Generator().manual_seed(5))
        own = dict(ours.named_parameters())
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "lora" in name:
                    p.copy_(own[rename(name)])
    return hf, ours, rename


@pytest.mark.parametrize("mode", ["ft", "lora"])
@pytest.mark.parametrize("kind", ["opt125", "opt350", "roberta"])
def test_reference_mode_reproduces_the_original_run_bitwise(kind, mode):
    hf, ours, rename = _models(kind, mode)
    initial = _weights(ours)
    batches, settings = _batches(kind), SETTINGS[mode]
    with torch.random.fork_rng():
        numpy_state = np.random.get_state()
        try:
            expected = _run_original(hf, batches, rename, settings)
            got = _run_ours(ours, batches, settings)
        finally:
            np.random.set_state(numpy_state)
    for step, ((seed, grad, weights), (our_seed, our_grad, our_weights)) in enumerate(
        zip(expected, got)
    ):
        assert our_seed == seed, f"step {step}: seed"
        assert our_grad == grad, f"step {step}: projected_grad {our_grad!r} != {grad!r}"
        assert our_weights.keys() == weights.keys()
        differ = {
            n: (our_weights[n] - w).abs().max().item()
            for n, w in weights.items()
            if not torch.equal(our_weights[n], w)
        }
        assert not differ, (
            f"step {step}: {len(differ)} of {len(weights)} tensors differ, "
            f"max {max(differ.values())}"
        )
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    # the run did move
    assert {n for n, w in got[-1][2].items() if not torch.equal(w, initial[n])} == trained
