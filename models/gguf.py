"""GGUF (llama.cpp's file format) to a Hugging Face checkpoint folder, for LLaMA-architecture
models.

    python -m models.gguf SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2    # then
    load_model("out/smollm2")

Writes config.json, model.safetensors (fp32) and the tokenizer (tokenizer.json built with the
`tokenizers` library, tokenizer_config.json with the special tokens and chat template).
- Dequantises F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors (numpy, below); other types are refused.
- GGUF lists dimensions innermost first ([in, out] for a weight); rows are stored as torch stores
  them.
- llama.cpp's converter permutes the rows of Q and K for its rotary layout (pairs (i, i + d/2) of
  each head become adjacent); that is undone here, or the model produces nonsense.
The `gguf` package (llama.cpp's reader) is an optional extra, imported only here: `pip install
gguf`. A user mistake ends with one `error:` line and exit status 2, and nothing is written: the
folder is assembled in a temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import ModelError

BLOCK = 32  # values per block of every supported quantised type
ARCHITECTURES = {"llama": "LlamaForCausalLM"}
TENSOR_NAMES = {  # GGUF name (after `blk.{i}.`) -> transformers name (after `model.layers.{i}.`)
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp's token types
# `tokenizer.ggml.pre` values whose splitting is built here
PRE_TOKENIZERS = ("default", "gpt-2", "smollm")


# ---------------------------------------------------------------- dequantisation (ggml block
# layouts)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: the low nibbles are values 0..15 of the block, the high nibbles
    16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _q8_0(b):  # [fp16 d][32 x int8 q]: d * q
    return _f16(b[:, :2]) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)


def _q4_0(b):  # [fp16 d][16 bytes of 4-bit q]: d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8)


def _q4_1(b):  # [fp16 d][fp16 m][16 bytes of 4-bit q]: d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


# bytes per block, decoder
QUANTISED = {"Q8_0": (34, _q8_0), "Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1)}
SUPPORTED = ("F32", "F16", "BF16", *QUANTISED)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 tensor of one GGUF tensor: raw `data` of type `type_name`, torch `shape` (outer
    first)."""
    raw = np.ascontiguousarray(data)
    if type_name == "F32":
        values = raw.view(np.float32)
    elif type_name == "F16":
        values = raw.view(np.float16).astype(np.float32)
    elif type_name == "BF16":  # the top half of an fp32
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif type_name in QUANTISED:
        size, decode = QUANTISED[type_name]
        values = decode(raw.view(np.uint8).reshape(-1, size))
    else:
        raise ModelError(
            f"unsupported tensor type {type_name}, expected one of {', '.join(SUPPORTED)}"
        )
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's `permute` of Q / K rows, which is reshape(heads, 2, d/2) -> swap ->
    flatten."""
    return (
        w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


# ---------------------------------------------------------------- reading


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ModelError(
            "reading GGUF needs the gguf package: pip install gguf (or pip install -e '.[test]') "
            "(models.gguf)"
        ) from None
    try:
        return gguf.GGUFReader(str(path))
    # the reader raises ValueError / struct errors / OSError on foreign files
    except Exception as e:
        raise ModelError(f"not a GGUF file: {e} ({path})") from None


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field type this version of gguf cannot decode: not one we read
            continue
    return out


def _decimal(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _config(meta: dict, arch: str, tensor_names: set[str], path: Path) -> dict:
    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"missing metadata {arch}.{key} ({path})")
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ModelError(
            "unsupported rope scaling in GGUF "
            f"({scaling if scaling != 'none' else 'rope_freqs'}) ({path})"
        )
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _decimal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    for role in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id"
        if key in meta:
            cfg[f"{role}_token_id"] = int(meta[key])
    return cfg


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (
        len(parts) == 4
        and parts[0] == "blk"
        and parts[2] in TENSOR_NAMES
        and parts[3] in ("weight", "bias")
    ):
        return f"model.layers.{parts[1]}.{TENSOR_NAMES[parts[2]]}.{parts[3]}"
    raise ModelError(f"unsupported tensor {gguf_name} ({path})")


def _tokenizer_files(meta: dict, path: Path) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json of a GPT-2-style byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ModelError(
            f"unsupported tokenizer {kind!r} with pre-tokenizer {pre!r}; supported: byte-level BPE "
            f"('gpt2') with {', '.join(PRE_TOKENIZERS)} ({path})"
        )
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # smollm: every digit is its own piece before the GPT-2 regex (SmolLM's own tokenizer.json)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if pre == "smollm"
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (chat markers, <|endoftext|>) must be special, or "<|im_start|>" splits into
    # bytes.
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k == TOKEN_CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == TOKEN_USER_DEFINED
        ]
    )

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_bos, add_eos = (
        bool(meta.get(f"tokenizer.ggml.add_{k}_token", False)) for k in ("bos", "eos")
    )
    # transformers adds BOS / EOS through tokenizer.json's post-processor (models.tokenizer reads
    # the flags)
    template = ["<bos>"] * add_bos + ["$A"] + ["<eos>"] * add_eos
    specials = [
        (token(k), tokens.index(token(k))) for k, on in (("bos", add_bos), ("eos", add_eos)) if on
    ]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=" ".join(template)
                .replace("<bos>", token("bos") or "")
                .replace("<eos>", token("eos") or ""),
                special_tokens=specials,
            ),
        ]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "additional_special_tokens": [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL],
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


# ---------------------------------------------------------------- converting


def convert(gguf_path, out_dir) -> Path:
    """Write the Hugging Face folder of a GGUF file to `out_dir` (absent or empty); -> out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"missing GGUF file ({gguf_path})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"output folder exists and is not empty ({out_dir})")
    reader = _reader(gguf_path)
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(
            f"unsupported architecture {arch!r}, "
            f"expected one of {sorted(ARCHITECTURES)} ({gguf_path})"
        )
    names = {t.name for t in reader.tensors}
    cfg = _config(meta, arch, names, gguf_path)
    for t in reader.tensors:  # every check before the first byte is written
        _hf_name(t.name, gguf_path)
        if t.tensor_type.name not in SUPPORTED:
            raise ModelError(
                f"unsupported tensor type {t.tensor_type.name} of {t.name}, expected one of "
                f"{', '.join(SUPPORTED)} ({gguf_path})"
            )
    tokenizer = _tokenizer_files(meta, gguf_path)
    heads = {
        "self_attn.q_proj": cfg["num_attention_heads"],
        "self_attn.k_proj": cfg["num_key_value_heads"],
    }
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name, gguf_path)
        w = dequantize(t.data, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)))
        proj = name.split(".")[-2]
        if f"self_attn.{proj}" in heads:
            w = unpermute_rows(w, heads[f"self_attn.{proj}"])
        tensors[name] = w
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for file, text in tokenizer.items():
            (tmp / file).write_text(text)
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        os.rename(tmp, out_dir)  # onto an absent or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0].startswith("-"):
        print(
            "error: usage: python -m models.gguf FILE.gguf OUT_DIR (command line)", file=sys.stderr
        )
        return 2
    try:
        out = convert(*argv)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
