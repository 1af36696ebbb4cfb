"""Tokenizers of Hugging Face checkpoint directories, without transformers: the same ids as
transformers.

Files, in order of preference: `tokenizer.json`; `vocab.json` + `merges.txt` (byte-level BPE, as OPT
and RoBERTa ship); `tokenizer.model` (sentencepiece). `tokenizer_config.json` and
`special_tokens_map.json` name the special tokens and whether BOS / EOS are added. Special tokens
are added here, not by a tokenizer.json post-processor, so a caller may override `bos_token_id`
(MeZO's OPT code forces id 0 in large_models/run.py; that choice belongs to data/, which reads
`model_type` to apply it to OPT only).
  OPT:     [</s>] + text              (bos = eos = `</s>`, id 2; `add_bos_token`)
  RoBERTa: [<s>] + text + [</s>]      (`<mask>` swallows the space before it: lstrip=True)
  LLaMA family: as tokenizer_config.json says (`add_bos_token`; Llama 2 / 3 add BOS, SmolLM2 none)
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from . import ModelError
from .checkpoint import resolve

SPECIAL_ROLES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
DEFAULTS = {  # what transformers' OPT (GPT2) and RoBERTa tokenizers use when the files say nothing
    "opt": {
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
    },
    "roberta": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": {"content": "<mask>", "lstrip": True},
        "add_bos_token": True,
        "add_eos_token": True,
    },
}


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"corrupt tokenizer file: {e} ({file})") from None


def _model_type(directory: Path, settings: dict) -> str | None:
    model_type = _read_json(directory / "config.json").get("model_type")
    if model_type is None:  # a tokenizer-only directory: guess from transformers' class name
        cls = str(settings.get("tokenizer_class", ""))
        model_type = (
            "roberta" if cls.startswith("Roberta") else "opt" if cls.startswith("GPT2") else None
        )
    return model_type


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """encode / decode with the special-token rules of the checkpoint's model type (`model_type`
    names the family)."""

    def __init__(self, directory: Path):
        settings = {
            **_read_json(directory / "tokenizer_config.json"),
            **_read_json(directory / "special_tokens_map.json"),
        }
        self.model_type = _model_type(directory, settings)
        settings = {**DEFAULTS.get(self.model_type, {}), **settings}
        if (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file():
            self._bpe = self._load_bpe(directory, settings)
            self._sp = None
            to_id = self._bpe.token_to_id
        elif (directory / "tokenizer.model").is_file():
            self._bpe = None
            self._sp = sp = self._load_sentencepiece(directory / "tokenizer.model")
            settings = {
                "bos_token": sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
                "eos_token": sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
                "unk_token": sp.id_to_piece(sp.unk_id()),
                "pad_token": sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None,
                # LLaMA's convention
                "add_bos_token": True,
                "add_eos_token": False,
                **settings,
            }
            to_id = sp.piece_to_id
        else:
            raise ModelError(
                f"missing tokenizer files: tokenizer.json, vocab.json + merges.txt, or "
                f"tokenizer.model ({directory})"
            )
        ids = {
            role: to_id(_content(settings[role])) if settings.get(role) else None
            for role in SPECIAL_ROLES
        }
        self.bos_token_id, self.eos_token_id = ids["bos_token"], ids["eos_token"]
        self.pad_token_id, self.mask_token_id, self.unk_token_id = (
            ids["pad_token"],
            ids["mask_token"],
            ids["unk_token"],
        )
        self.add_bos_token = bool(settings.get("add_bos_token", False))
        self.add_eos_token = bool(settings.get("add_eos_token", False))
        self.vocab_size = (
            self._bpe.get_vocab_size(with_added_tokens=True)
            if self._bpe
            else self._sp.get_piece_size()
        )

    @staticmethod
    def _load_sentencepiece(file: Path) -> sentencepiece.SentencePieceProcessor:
        try:
            return sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError):  # RuntimeError("INTERNAL: could not parse ... from FILE")
            raise ModelError(
                f"corrupt tokenizer file: not a sentencepiece model ({file})"
            ) from None

    @staticmethod
    def _load_bpe(directory: Path, settings: dict) -> BackendTokenizer:
        full = (directory / "tokenizer.json").is_file()
        source = directory / ("tokenizer.json" if full else "vocab.json")
        if not full and not (directory / "merges.txt").is_file():
            raise ModelError(f"missing tokenizer file ({directory / 'merges.txt'})")
        try:
            tok = (
                BackendTokenizer.from_file(str(source))
                if full
                else BackendTokenizer(
                    models.BPE.from_file(str(source), str(directory / "merges.txt"))
                )
            )
        except Exception as e:  # the tokenizers library reports malformed files as plain exceptions
            raise ModelError(f"corrupt tokenizer file: {e} ({source})") from None
        if full:
            tok.no_truncation()
            tok.no_padding()
        else:  # what transformers' GPT2 / RoBERTa tokenizers build from vocab.json + merges.txt
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(
                add_prefix_space=settings.get("add_prefix_space", False)
            )
            tok.decoder = decoders.ByteLevel()
        # Register the named special tokens; flags already stored in tokenizer.json win (as in
        # transformers).
        known = {t.content for t in tok.get_added_tokens_decoder().values()}
        named = [settings.get(role) for role in SPECIAL_ROLES] + list(
            settings.get("additional_special_tokens", [])
        )
        for token in named:
            if token and _content(token) not in known:
                # {"content": ..., "lstrip": true, ...}
                given = token if isinstance(token, dict) else {}
                flags = {k: given[k] for k in ("lstrip", "rstrip", "single_word") if k in given}
                tok.add_special_tokens(
                    [AddedToken(_content(token), special=True, normalized=False, **flags)]
                )
                known.add(_content(token))
        return tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = (
            self._bpe.encode(text, add_special_tokens=False).ids
            if self._bpe
            else self._sp.encode(text)
        )
        if add_special_tokens:
            ids = (
                [self.bos_token_id] * self.add_bos_token
                + ids
                + [self.eos_token_id] * self.add_eos_token
            )
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._bpe:
            return self._bpe.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids)  # sentencepiece never prints control tokens (bos / eos)

    def convert_tokens_to_ids(self, token: str) -> int:
        if self._sp:
            return self._sp.piece_to_id(token)
        found = self._bpe.token_to_id(token)
        return self.unk_token_id if found is None else found


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint directory or of a hub name in the local HF cache."""
    return Tokenizer(resolve(path))
