"""Checkpoint I/O: every layout we read, what we write loads in transformers, hub-cache lookup,
errors."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import models.checkpoint
from models import ModelError, apply_lora, load_model, save_model
from tests.helpers.models import hf_opt, hf_roberta, padded_batch


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _hf_logits(path, kind, ids, mask):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if kind == "roberta" else AutoModelForCausalLM
    with torch.no_grad():
        return cls.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ["opt125", "opt350", "roberta"])
def test_saved_model_loads_in_transformers_sharded_or_not(kind, tmp_path):
    path, _ = hf_roberta() if kind == "roberta" else hf_opt(kind)
    ours = load_model(path)
    ids, mask = padded_batch([6, 3], "right")
    save_model(ours, tmp_path / "single")
    save_model(ours, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert _same_weights(load_model(tmp_path / "sharded"), load_model(tmp_path / "single"))
    with torch.no_grad():
        expected = ours(ids, mask)
    for layout in ("single", "sharded"):
        assert (_hf_logits(tmp_path / layout, kind, ids, mask) - expected)[
            mask.bool()
        ].abs().max() <= 1e-5
    # canonical names, tied head stored once
    stored = load_file(tmp_path / "single" / "model.safetensors")
    head = "lm_head.decoder.weight" if kind == "roberta" else "lm_head.weight"
    assert head not in stored and ("lm_head.bias" in stored) == (kind == "roberta")
    config = json.loads((tmp_path / "single" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"]


def test_transformers_sharded_checkpoint_equals_single_file(tmp_path):
    path, hf = hf_opt()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert _same_weights(load_model(tmp_path), load_model(path))


def test_pytorch_model_bin_and_keys_without_model_prefix(tmp_path):
    path, _ = hf_opt("opt350")
    tensors = load_file(path / "model.safetensors")
    _copy(path, tmp_path / "bin").joinpath("model.safetensors").unlink()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    # hub OPT stores `decoder.*`
    hub_style = {k.removeprefix("model."): v for k, v in tensors.items()}
    _copy(path, tmp_path / "bare")
    save_file(hub_style, tmp_path / "bare" / "model.safetensors")
    reference = load_model(path)
    assert _same_weights(load_model(tmp_path / "bin"), reference)
    assert _same_weights(load_model(tmp_path / "bare"), reference)


def test_roberta_untied_decoder_and_pooler(tmp_path):
    path, _ = hf_roberta()
    tensors = load_file(path / "model.safetensors")
    decoder = torch.randn_like(tensors["roberta.embeddings.word_embeddings.weight"])
    extra = {"lm_head.decoder.weight": decoder, "roberta.pooler.dense.weight": torch.zeros(64, 64)}
    save_file({**tensors, **extra}, _copy(path, tmp_path / "src") / "model.safetensors")
    model = load_model(tmp_path / "src")
    assert model.lm_head.decoder.weight is not model.roberta.embeddings.word_embeddings.weight
    assert torch.equal(model.lm_head.decoder.weight, decoder)
    save_model(model, tmp_path / "out")  # transformers must read it untied, with the same logits
    ids, mask = padded_batch([6, 3], "right")
    with torch.no_grad():
        assert (
            _hf_logits(tmp_path / "out", "roberta", ids, mask) - model(ids, mask)
        ).abs().max() <= 1e-5


def test_dtype_device_and_tied_parameter_identity():
    model = load_model(hf_opt()[0], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.decoder.embed_tokens.weight
    assert not model.training


def test_save_plain_tensors_bf16_and_merged_lora(tmp_path):
    path, _ = hf_opt()
    model = load_model(path, dtype=torch.bfloat16)
    # Replace parameters by plain tensors (as a perturbation hook or a flat buffer might).
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    offset = 0
    for name, p in list(model.named_parameters()):
        owner = model.get_submodule(name.rpartition(".")[0])
        view = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        owner._parameters[name.rpartition(".")[2]] = view
    save_model(model, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _same_weights(
        load_model(tmp_path / "plain", dtype=torch.bfloat16), load_model(path, dtype=torch.bfloat16)
    )

    lora = apply_lora(load_model(path))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    save_model(lora, tmp_path / "lora")
    ids, mask = padded_batch([6, 3], "left")
    with torch.no_grad():
        assert (load_model(tmp_path / "lora")(ids, mask) - lora(ids, mask)).abs().max() <= 1e-4


def test_save_is_atomic(tmp_path, monkeypatch):
    model = load_model(hf_opt()[0])
    target = save_model(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models.checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        save_model(model, target)
    # the old checkpoint, intact
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind


def _hub_layout(cache, repo, source, revisions):
    """models--org--name/{blobs, snapshots/<rev>/<file -> blob>, refs/main}, as huggingface_hub
    writes it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    for rev in revisions:
        (root / "snapshots" / rev).mkdir(parents=True)
        for file in source.iterdir():
            blob = root / "blobs" / f"{rev}-{file.name}"
            shutil.copyfile(file, blob)
            (root / "snapshots" / rev / file.name).symlink_to(
                os.path.relpath(blob, root / "snapshots" / rev)
            )
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revisions[0])


def test_hub_name_resolves_to_refs_main_snapshot(tmp_path, monkeypatch):
    path, _ = hf_opt()
    cache = tmp_path / "hub"
    _hub_layout(cache, "facebook/opt-tiny", path, ["a" * 40, "b" * 40])
    # the other revision is broken: only the one in refs/main may be read
    (cache / "models--facebook--opt-tiny" / "snapshots" / ("b" * 40) / "model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert models.checkpoint.resolve("facebook/opt-tiny").name == "a" * 40
    assert _same_weights(load_model("facebook/opt-tiny"), load_model(path))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert models.checkpoint.resolve("facebook/opt-tiny").name == "a" * 40
    with pytest.raises(ModelError, match="facebook/opt-absent"):
        load_model("facebook/opt-absent")


# ------------------------------------------------------ user mistakes -> ModelError naming the file


def _damaged(tmp_path, damage):
    directory = _copy(hf_opt()[0], tmp_path / "ckpt")
    damage(directory)
    with pytest.raises(ModelError) as err:
        load_model(directory)
    return str(err.value)


def test_missing_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="missing model directory.*nowhere"):
        load_model(tmp_path / "nowhere")


def test_missing_weight_file(tmp_path):
    msg = _damaged(tmp_path, lambda d: (d / "model.safetensors").unlink())
    assert msg.startswith("missing weight file") and msg.endswith("model.safetensors)")


def test_truncated_weight_file(tmp_path):
    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    msg = _damaged(tmp_path, truncate)
    assert msg.startswith("corrupt weight file") and msg.endswith("model.safetensors)")


def test_wrong_shape_and_missing_tensors(tmp_path):
    def reshape(d):
        t = load_file(d / "model.safetensors")
        t["model.decoder.layers.0.fc1.weight"] = t["model.decoder.layers.0.fc1.weight"][:-1]
        save_file(t, d / "model.safetensors")

    msg = _damaged(tmp_path, reshape)
    assert "model.decoder.layers.0.fc1.weight has shape (127, 64), expected (128, 64)" in msg
    assert msg.endswith("model.safetensors)")

    def drop(d):
        t = load_file(d / "model.safetensors")
        del t["model.decoder.final_layer_norm.bias"]
        save_file(t, d / "model.safetensors")

    shutil.rmtree(tmp_path / "ckpt")
    msg = _damaged(tmp_path, drop)
    assert "missing tensors decoder.final_layer_norm.bias" in msg and msg.endswith(
        "model.safetensors)"
    )


def test_unknown_model_type_and_missing_shard(tmp_path):
    def retype(d):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))

    msg = _damaged(tmp_path, retype)
    assert "unknown model_type 'gpt2'" in msg and msg.endswith("config.json)")

    path, hf = hf_opt()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelError, match=rf"missing weight file .*{shard.name}\)$"):
        load_model(tmp_path / "sharded")
