"""Hugging Face checkpoint directories in and out, without transformers.

Reading: config.json + `model.safetensors`, a sharded `model.safetensors.index.json`, or
`pytorch_model.bin` (optionally sharded with `pytorch_model.bin.index.json`). The model is built on
the meta device and every tensor is loaded straight into place (`load_state_dict(assign=True)`): no
randomly initialised copy and no second full copy in memory. Writing: the layout transformers writes
(canonical names, tied weights stored once, shards + index above `max_shard_size`), in a temporary
directory swapped into place (data/files.py `atomic_dir`), so a crash never leaves half a
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from data.files import atomic_dir

from . import ModelError
from .families import FAMILIES
from .layers import ACTIVATIONS
from .peft import LoRALinear

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


# ---------------------------------------------------------------- locating a checkpoint


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve(path) -> Path:
    """A checkpoint directory, or the local HF-cache snapshot of a hub name like `facebook/opt-13b`
    (the revision in refs/main, else the only or most recent snapshot). Never downloads."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelError(f"not a checkpoint directory ({p})")
    repo = hub_cache_dir() / ("models--" + str(path).replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = (
        sorted(snapshots.iterdir(), key=lambda s: s.stat().st_mtime) if snapshots.is_dir() else []
    )
    if candidates:
        return candidates[-1]
    raise ModelError(
        f"missing model directory, not found in the Hugging Face cache {hub_cache_dir()} ({path})"
    )


def read_config(directory: Path):
    """The config dataclass from config.json (HF field names; unknown fields are ignored)."""
    file = directory / "config.json"
    if not file.is_file():
        raise ModelError(f"missing config file ({file})")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"corrupt config file: {e} ({file})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in FAMILIES:
        raise ModelError(
            f"unknown model_type {model_type!r}, expected one of {sorted(FAMILIES)} ({file})"
        )
    config_cls = FAMILIES[model_type].config
    _check_sizes(raw, file)
    try:
        cfg = config_cls(
            **{f.name: raw[f.name] for f in dataclasses.fields(config_cls) if f.name in raw}
        )
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ModelError(f"bad config value: {e} ({file})") from None
    heads = cfg.num_attention_heads
    if getattr(cfg, "head_dim", None) is None and cfg.hidden_size % heads:
        raise ModelError(
            f"num_attention_heads {heads} does not divide hidden_size {cfg.hidden_size} ({file})"
        )
    if heads % getattr(cfg, "num_key_value_heads", heads):
        raise ModelError(
            f"num_key_value_heads {cfg.num_key_value_heads} does not divide num_attention_heads "
            f"{heads} ({file})"
        )
    if max_positions(cfg) < 2:
        raise ModelError(
            f"max_position_embeddings {cfg.max_position_embeddings} leaves no room for a sequence "
            f"({file})"
        )
    act = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
    if act not in ACTIVATIONS:
        raise ModelError(f"unsupported activation {act!r} ({file})")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ModelError(
            f"unsupported position_embedding_type {cfg.position_embedding_type!r} ({file})"
        )
    return cfg


SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "ffn_dim",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "word_embed_proj_dim",
    "type_vocab_size",
)


def _check_sizes(raw: dict, file: Path) -> None:
    """Every size in config.json a positive integer (null where transformers allows a default)."""
    for name in SIZES:
        value = raw.get(name)
        if value is None and name in ("num_key_value_heads", "head_dim", "word_embed_proj_dim"):
            continue
        if name in raw and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ModelError(f"{name} must be a positive integer, got {value!r} ({file})")


def max_positions(config) -> int:
    """The longest sequence the model can encode: its position rows less those no token takes."""
    return config.max_position_embeddings - FAMILIES[config.model_type].reserved_positions


# ---------------------------------------------------------------- names in files vs. ours


def our_name(model_type: str, key: str) -> str:
    """The parameter that the tensor `key` of a `model_type` checkpoint file loads into."""
    return FAMILIES[model_type].our_name(key)


def _hf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our tensors under the names transformers writes; LoRA merged into W; the tied head
    omitted."""
    cfg, family = model.config, FAMILIES[model.config.model_type]
    if any(name.endswith("prefix_keys") for name, _ in model.named_parameters()):
        raise ModelError(
            "a prefix-tuned model has no Hugging Face layout; save adapter_state_dict(model) "
            "instead (save_model)"
        )
    # references, no copies; plain tensors swapped in for Parameters work too
    tensors = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"{name}.weight"] = module.merged_weight().detach()
            del tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
    if cfg.tie_word_embeddings:
        del tensors[family.head]
    named = {family.file_name(name): t for name, t in tensors.items()}
    for name in () if cfg.tie_word_embeddings else family.untied_copies:
        named[name] = tensors[name].clone()  # safetensors refuses two names for one storage
    return named


# ---------------------------------------------------------------- reading


class _Weights:
    """The tensors of a checkpoint directory by file key, read lazily from one or several files."""

    def __init__(self, directory: Path, device):
        names = [f for f in WEIGHT_FILES if (directory / f).is_file()]
        if not names:
            raise ModelError(f"missing weight file ({directory / WEIGHT_FILES[1]})")
        self.device = str(device)
        self.source = directory / names[0]
        self._handles = {}
        if self.source.name.endswith(".index.json"):
            try:
                weight_map = json.loads(self.source.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelError(f"corrupt index file: {e!r} ({self.source})") from None
            self.file_of = {k: directory / f for k, f in weight_map.items()}
        else:
            self.file_of = {k: self.source for k in self._open(self.source).keys()}

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise ModelError(f"missing weight file ({file})")
            try:
                self._handles[file] = (
                    safe_open(file, framework="pt", device=self.device)
                    if file.suffix == ".safetensors"
                    else _torch_load(file)
                )
            except pickle.UnpicklingError:  # weights_only refused an object: never unpickled
                raise ModelError(
                    f"weight file holds Python objects besides tensors, which are never unpickled; "
                    f"convert it to safetensors ({file})"
                ) from None
            except Exception as e:  # safetensors / zip / pickle errors of a damaged file
                raise ModelError(f"corrupt weight file: {_first_line(e)} ({file})") from None
        return self._handles[file]

    def get(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        handle = self._open(file)
        try:
            return handle.get_tensor(key) if file.suffix == ".safetensors" else handle[key]
        except Exception as e:
            raise ModelError(
                f"corrupt weight file: cannot read {key}: {_first_line(e)} ({file})"
            ) from None


def _torch_load(file: Path) -> dict:
    # torch warns (two lines) of a pickle protocol it may not read: what it reads, or the one line
    # refusing it, is all a user needs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # mmap only for the zip format: torch cannot map an old-format (pre-1.6) .bin
        return torch.load(
            file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)
        )


def _first_line(error: Exception) -> str:
    """torch's messages run over several lines; the first says what went wrong."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_model(path, dtype=torch.float32, device="cpu") -> nn.Module:
    """OPT, RoBERTa-MLM or a LLaMA-family model (families.py) from a checkpoint directory or a hub
    name in the local HF cache, in eval mode."""
    directory = resolve(path)
    cfg = read_config(directory)
    weights = _Weights(directory, device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    family = FAMILIES[cfg.model_type]
    if family.stored_head_unties and family.file_name(family.head) in weights.file_of:
        cfg.tie_word_embeddings = False  # e.g. roberta-large: the decoder is its own matrix
    with torch.device("meta"):
        model = family.model(cfg)
    # a tied weight appears once, under its embedding name
    expected = dict(model.named_parameters())
    # Skipped, as no parameter of ours: pooler, legacy buffers, a tied head's stored copy. Of
    # `lm_head.bias` and `lm_head.decoder.bias` the decoder's own wins (transformers' when untied).
    key_of = {}
    for key in weights.file_of:
        name = family.our_name(key)
        if name in expected and (name not in key_of or key == name):
            key_of[name] = key
    state = {}
    for name, key in key_of.items():
        tensor = weights.get(key)
        if tensor.shape != expected[name].shape:
            raise ModelError(
                f"tensor {key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[name].shape)} ({weights.file_of[key]})"
            )
        # the model computes in floating point: a cast would hide it
        if not tensor.is_floating_point():
            raise ModelError(
                f"tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected a "
                f"floating-point dtype ({weights.file_of[key]})"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ModelError(
            f"missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
            f"({weights.source})"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def check_tokenizer(model: nn.Module, tokenizer, directory) -> None:
    """Every id the tokenizer can produce must have an embedding row."""
    rows = model.config.vocab_size
    if tokenizer.vocab_size > rows:
        raise ModelError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model's embedding {rows} rows "
            f"(vocab_size in {Path(directory) / 'config.json'})"
        )


# ---------------------------------------------------------------- writing


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
    if not m:
        raise ModelError(f"bad max_shard_size {size!r}, expected bytes or e.g. '5GB' (save_model)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Consecutive groups under `limit` bytes; a tensor larger than the limit gets a shard of its
    own."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share storage (views into a flat buffer): copy those.
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _config_json(model: nn.Module, tensors) -> dict:
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    return {
        **dataclasses.asdict(model.config),
        "architectures": [FAMILIES[model.config.model_type].architecture],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_model(model: nn.Module, path, max_shard_size="5GB", tokenizer_dir=None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (transformers loads it), atomically.

    An existing directory at `path` is replaced as a whole. LoRA is merged into the weights.
    tokenizer_dir: copy the tokenizer files found there, to make a complete checkpoint.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ModelError(f"not a directory ({path})")
    tensors = _hf_tensors(model)
    shards = _shards(tensors, _parse_size(max_shard_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(
            json.dumps(_config_json(model, tensors), indent=2, sort_keys=True) + "\n"
        )
        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for file, names in zip(files, shards):
            save_file(
                {n: _to_cpu(tensors[n]) for n in names}, tmp / file, metadata={"format": "pt"}
            )
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                    "total_parameters": sum(t.numel() for t in tensors.values()),
                },
                "weight_map": {n: f for f, names in zip(files, shards) for n in names},
            }
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    return path
