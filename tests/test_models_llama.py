"""What only the LLaMA family has (Llama 3 rope scaling, biases, Qwen2, Mistral's sliding window),
against transformers on tiny random weights: bf16, rope, generation without a pad token,
save/load, LoRA, prefix and a MeZO step. Logits, parameter order and greedy generation are in
the one table of tests/test_models_parity.py."""

import warnings

import pytest
import torch

from models import ModelError, apply_lora, apply_prefix, load_model, save_model
from models.llama import LlamaConfig, rope_inv_freq
from tests.helpers.models import hf_llama, llama_logits, mask_positions, padded_batch

LENGTHS = [7, 3, 5, 7]


@pytest.mark.parametrize("layout", ["llama3", "qwen2"])
@torch.no_grad()
def test_bf16_stays_close_to_transformers_bf16(layout):
    path, hf = hf_llama(layout)
    ids, mask = padded_batch(LENGTHS, "left")
    ours = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    logits = ours(ids, mask)
    ref = llama_logits(hf, ids, mask)
    ref_low = llama_logits(type(hf).from_pretrained(path, dtype=torch.bfloat16).eval(), ids, mask)
    m, scale = mask.bool(), ref.abs().max()
    assert logits.dtype == torch.bfloat16
    # random 0.3-std weights make bf16 rounding large (~5% of the logit scale, transformers' too):
    # the bar is transformers' own bf16 model, and no more error against fp32 than it has
    assert (logits.float() - ref_low.float()).abs()[m].max() <= 0.002 * scale
    assert (logits.float() - ref).abs()[m].max() <= (ref_low.float() - ref).abs()[
        m
    ].max() + 0.002 * scale


def test_llama3_rope_frequencies_equal_transformers():
    path, hf = hf_llama("llama3")
    cfg = load_model(path).config
    assert cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0
    ref = hf.model.rotary_emb.inv_freq
    ours = rope_inv_freq(cfg, "cpu")
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0) and not torch.allclose(ours, ref * 8)
    default = rope_inv_freq(
        LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0), "cpu"
    )
    assert not torch.allclose(ours, default)  # the scaling changed the low frequencies


def test_unsupported_rope_and_head_grouping_are_refused():
    with pytest.raises(ModelError, match="rope_scaling type 'yarn'"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=4, num_key_value_heads=3)


@torch.no_grad()
def test_generation_without_pad_token_fills_with_the_stop_token():
    path, _ = hf_llama("qwen2")
    model = load_model(path)
    ids, mask = padded_batch([6, 2, 4], "left", seed=3)
    first = model.generate(ids, mask, max_new_tokens=6, eos_token_ids=())
    stop = int(first[0, 1])  # row 0 stops at its second token
    model.config.pad_token_id = None
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_ids=[stop])
    assert out[0, 1] == stop and (out[0, 2:] == stop).all()


@pytest.mark.parametrize("layout", ["llama3", "qwen2", "mistral"])
@torch.no_grad()
def test_saved_model_loads_in_transformers(layout, tmp_path):
    import transformers

    path, hf = hf_llama(layout)
    model = apply_lora(load_model(path))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.normal_()  # a non-trivial adapter, merged into the saved weights
    ids, mask = padded_batch(LENGTHS, "left")
    expected = model(ids, mask)
    save_model(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf)
    assert (llama_logits(reloaded, ids, mask) - expected).abs()[mask.bool()].max() <= 1e-4
    assert (load_model(tmp_path / "out")(ids, mask) - expected).abs()[mask.bool()].max() <= 1e-4


@torch.no_grad()
def test_lora_trains_q_and_v_only_and_starts_as_the_base_model():
    path, _ = hf_llama("llama3")
    ids, mask = padded_batch(LENGTHS, "left")
    base = load_model(path)(ids, mask)
    model = apply_lora(load_model(path), r=4, alpha=8)
    assert torch.equal(model(ids, mask), base)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"model.layers.{i}.self_attn.{t}.{ab}"
        for i in range(2)
        for t in ("q_proj", "v_proj")
        for ab in ("lora_A", "lora_B")
    )
    assert model.model.layers[0].self_attn.v_proj.lora_B.shape == (2 * 16, 4)  # kv heads * head_dim


@torch.no_grad()
def test_prefix_matches_transformers_fed_the_prefix_as_past_key_values():
    from transformers import DynamicCache

    path, hf = hf_llama("qwen2")
    ids, mask = padded_batch([7, 3, 5], "left")
    model = apply_prefix(load_model(path), num_prefix=5, generator=torch.Generator().manual_seed(0))
    attns = [m for m in model.modules() if hasattr(m, "prefix_keys")]
    assert attns[0].prefix_keys.shape == (5, 2 * 16)
    B, P = ids.shape[0], 5
    cache = DynamicCache(config=hf.config)
    for i, attn in enumerate(attns):  # raw projections, stored as the cache stores rotated keys
        k, v = (
            t.view(1, P, 2, 16).transpose(1, 2).expand(B, -1, -1, -1)
            for t in (attn.prefix_keys, attn.prefix_values)
        )
        cache.update(k, v, i)
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1)
    ref = hf(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=mask_positions(mask),
        past_key_values=cache,
    ).logits
    assert (model(ids, mask) - ref).abs()[mask.bool()].max() <= 1e-4
    cached = model.generate(ids, mask, max_new_tokens=4, eos_token_ids=())
    seq, full = ids, mask
    for _ in range(4):  # positions must not shift by the prefix length in cached decoding
        nxt = model(seq, full)[:, -1].argmax(-1, keepdim=True)
        seq, full = torch.cat([seq, nxt], 1), torch.cat([full, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, seq[:, ids.shape[1] :])


@pytest.mark.parametrize("mode", ["ft", "lora"])
def test_mezo_step_perturbs_every_trainable_parameter_inside_its_forward(mode):
    """zo/'s hooks see every parameter (tied head included) and a step with lr=0 changes nothing."""
    import zo

    path, _ = hf_llama("qwen2")
    model = load_model(path)
    if mode == "lora":
        apply_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = padded_batch(LENGTHS, "left")
    mezo = zo.MeZO(model, zo.MeZOConfig(lr=0.0, eps=1e-3, perturbation="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "never perturbed" would be a warning
        loss, grad = mezo.zo_step(model, lambda m: m(ids, mask).float().logsumexp(-1).mean())
    assert torch.isfinite(grad) and grad != 0
    mezo.zo_update(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- tasks on the LLaMA family


class _Tokenizer:
    """Duck-typed tokenizer: one id per character (+10), BOS id 1 when add_bos_token."""

    def __init__(self, model_type, add_bos_token):
        self.model_type, self.add_bos_token, self.bos_token_id = model_type, add_bos_token, 1

    def encode(self, text, add_special_tokens=True):
        return [self.bos_token_id] * (add_special_tokens and self.add_bos_token) + [
            10 + ord(c) % 50 for c in text
        ]


@pytest.mark.parametrize(
    "model_type, add_bos, first", [("opt", True, 0), ("llama", True, 1), ("qwen2", False, None)]
)
def test_bos_follows_the_tokenizer_and_the_bos_0_rule_is_opt_only(model_type, add_bos, first):
    import data

    task = data.get_task("SST2", family=model_type)
    # the decoder family runs the OPT-side tasks
    assert task is data.get_task("SST2") and task.family == "opt"
    sample = task.load(None)["valid"][0]
    ids = data.encode(task, sample, _Tokenizer(model_type, add_bos)).input_ids[0]
    body = _Tokenizer(model_type, False).encode(data.prompt_texts(task, [], sample)[0][0])
    assert ids == ([first] if first is not None else []) + body


def test_unknown_family_is_refused():
    import data

    for family in ("llama", "qwen2", "mistral"):
        assert data.get_task("Copa", family=family).name == "Copa"
    with pytest.raises(data.DataError, match="unknown model family 'gpt2'"):
        data.get_task("SST2", family="gpt2")


@pytest.fixture(scope="module")
def tiny_llama_checkpoint():
    from tests.helpers.models import tiny_llama_dir

    return tiny_llama_dir()


def test_train_and_eval_run_an_opt_side_task_on_a_llama_model(tiny_llama_checkpoint, tmp_path):
    import json

    import eval as evaluation
    import train

    out = tmp_path / "run"
    argv = [
        "--task",
        "SST2",
        "--model",
        str(tiny_llama_checkpoint),
        "--mode",
        "lora",
        "--num_train",
        "24",
        "--num_dev",
        "8",
        "--num_eval",
        "8",
        "--batch_size",
        "4",
        "--max_steps",
        "2",
        "--eval_steps",
        "2",
        "--logging_steps",
        "1",
        "--learning_rate",
        "1e-2",
        "--output_dir",
        str(out),
    ]
    assert train.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (
        evaluation.main(
            [
                "--task",
                "SST2",
                "--model",
                str(tiny_llama_checkpoint),
                "--num_eval",
                "8",
                "--adapter",
                str(out / "model.adapter.safetensors"),
                "--output_dir",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    # eval.py on the saved adapter scores the same 8 test examples as the run's own final evaluation
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["test"] == results["test"]
