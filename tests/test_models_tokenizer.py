"""Our tokenizer loader against transformers' tokenizers (and sentencepiece itself) on files trained
here."""

import json
import shutil

import pytest
import sentencepiece

from models import ModelError, load_tokenizer
from tests.helpers.models import CORPUS, ROOT, bpe_dir

TEXTS = [
    "Hello world",
    " Hello world",
    "It was<mask>.",
    "Hello <mask> world</s><pad>",
    "<s>A question? Yes",
    "great terrible Yes No",
    "ünïcödé ✓ text\nnew  line",
    "",
]


def _hf_saved(kind):
    """A directory written by transformers' save_pretrained (tokenizer.json +
    tokenizer_config.json)."""
    from transformers import AddedToken, GPT2Tokenizer, RobertaTokenizer

    vocab, merges = str(bpe_dir() / "vocab.json"), str(bpe_dir() / "merges.txt")
    if kind == "opt":  # how facebook/opt-* is configured
        hf = GPT2Tokenizer(
            vocab=vocab,
            merges=merges,
            bos_token="</s>",
            eos_token="</s>",
            unk_token="</s>",
            pad_token="<pad>",
            add_bos_token=True,
        )
    else:  # roberta-base's <mask> takes the space before it
        hf = RobertaTokenizer(
            vocab=vocab,
            merges=merges,
            mask_token=AddedToken(
                "<mask>", lstrip=True, rstrip=False, normalized=False, special=True
            ),
        )
    path = ROOT / f"hf_tok_{kind}"
    if not path.exists():
        hf.save_pretrained(path)
    return path


def _vocab_merges(tmp_path, config):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir() / f, tmp_path / f)
    for name, content in config.items():
        (tmp_path / name).write_text(json.dumps(content))
    return tmp_path


def _assert_same(ours, hf):
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert (
            ours.encode(text, add_special_tokens=False)
            == hf(text, add_special_tokens=False)["input_ids"]
        )
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(
            ids, skip_special_tokens=False
        )
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.mask_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
        hf.mask_token_id,
    )
    assert ours.vocab_size == len(hf)
    assert ours.convert_tokens_to_ids("Ġworld") == hf.convert_tokens_to_ids("Ġworld")


@pytest.mark.parametrize("kind", ["opt", "roberta"])
def test_tokenizer_json_matches_transformers(kind):
    from transformers import AutoTokenizer

    path = _hf_saved(kind)
    ours = load_tokenizer(path)
    assert ours.model_type == kind  # from tokenizer_class: there is no config.json here
    _assert_same(ours, AutoTokenizer.from_pretrained(path))


def test_opt_vocab_merges_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
    }
    path = _vocab_merges(tmp_path, {"tokenizer_config.json": config})
    ours = load_tokenizer(path)
    _assert_same(ours, AutoTokenizer.from_pretrained(path))
    assert ours.encode("Hi")[0] == 2 and ours.add_bos_token and ours.mask_token_id is None


def test_roberta_vocab_merges_defaults_match_roberta_base(tmp_path):
    from transformers import AddedToken, RobertaTokenizer

    path = _vocab_merges(tmp_path, {"config.json": {"model_type": "roberta"}})
    hf = RobertaTokenizer(
        vocab=str(path / "vocab.json"),
        merges=str(path / "merges.txt"),
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True),
    )
    ours = load_tokenizer(path)
    _assert_same(ours, hf)
    assert ours.encode("It was <mask>.") == ours.encode("It was<mask>.")  # lstrip: the space goes


def test_bos_token_id_is_settable():
    tok = load_tokenizer(_hf_saved("opt"))
    # MeZO's OPT runs force <s> (large_models/run.py: `tokenizer.bos_token_id = 0`, the HF tokenizer
    # bug fix)
    tok.bos_token_id = 0
    assert tok.encode("Hello")[0] == 0 and tok.encode("Hello", add_special_tokens=False)[0] != 0


def test_sentencepiece_model_encodes_like_sentencepiece(tmp_path):
    import io

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=120,
        model_type="bpe",
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    ours = load_tokenizer(tmp_path)
    for text in TEXTS[:2] + ["Zeroth-order optimisation of language models."]:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text)
        assert ours.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text))
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.get_piece_size(),
    )


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(ModelError, match=rf"missing tokenizer files.*\({tmp_path}\)$"):
        load_tokenizer(tmp_path)
    shutil.copy(bpe_dir() / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(ModelError, match=r"missing tokenizer file .*merges.txt\)$"):
        load_tokenizer(tmp_path)


def test_a_corrupt_sentencepiece_model_is_a_model_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(
        ModelError, match=rf"corrupt tokenizer file: .*\({tmp_path}/tokenizer.model\)$"
    ):
        load_tokenizer(tmp_path)
