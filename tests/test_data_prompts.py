"""Prompts of every task, byte for byte. Expected strings are written by hand from the reference
(large_models/templates.py for OPT, LM-BFF's templates for RoBERTa), not produced by the code under
test."""

import pytest

import data
from data import Sample, get_task
from tests.helpers.data import opt_tokenizer, roberta_tokenizer

# (task, HF-field row, expected prompt per candidate, index of the correct candidate)
OPT_CASES = [
    (
        "SST2",
        {"sentence": " it 's a charming and moving journey . ", "label": 1, "idx": 0},
        [
            "it 's a charming and moving journey . It was terrible",
            "it 's a charming and moving journey . It was great",
        ],
        1,
    ),
    (
        "RTE",
        {
            "premise": "Dana Reeve died in 2006.",
            "hypothesis": "Reeve is dead.",
            "label": 0,
            "idx": 3,
        },
        [
            "Dana Reeve died in 2006.\n"
            'Does this mean that "Reeve is dead." is true? Yes or No?\nYes',
            "Dana Reeve died in 2006.\n"
            'Does this mean that "Reeve is dead." is true? Yes or No?\nNo',
        ],
        0,
    ),
    (
        "CB",
        {
            "premise": "It was a good idea, I think.",
            "hypothesis": "it was a good idea",
            "label": 2,
            "idx": 1,
        },
        [
            'Suppose It was a good idea, I think. Can we infer that "it was a good idea"? '
            "Yes, No, or Maybe?\nYes",
            'Suppose It was a good idea, I think. Can we infer that "it was a good idea"? '
            "Yes, No, or Maybe?\nNo",
            'Suppose It was a good idea, I think. Can we infer that "it was a good idea"? '
            "Yes, No, or Maybe?\nMaybe",
        ],
        2,
    ),
    (
        "BoolQ",
        {
            "question": "is ice the solid form of water",
            "passage": "Ice is frozen water.",
            "answer": False,
        },
        [
            "Ice is frozen water. Is ice the solid form of water?\nYes",
            "Ice is frozen water. Is ice the solid form of water?\nNo",
        ],
        1,
    ),
    (
        "BoolQ",
        {"question": "can bats fly?", "passage": "Bats fly.", "answer": True},
        ["Bats fly. Can bats fly?\nYes", "Bats fly. Can bats fly?\nNo"],
        0,
    ),
    (
        "MultiRC",
        {
            "paragraph": "Lena grew tomatoes.",
            "question": "What did Lena grow?",
            "answer": "Tomatoes",
            "label": 1,
            "idx": {"paragraph": 0, "question": 0, "answer": 0},
        },
        [
            "Lena grew tomatoes.\nQuestion: What did Lena grow?\n"
            'I found this answer "Tomatoes". Is that correct? Yes or No?\nNo',
            "Lena grew tomatoes.\nQuestion: What did Lena grow?\n"
            'I found this answer "Tomatoes". Is that correct? Yes or No?\nYes',
        ],
        1,
    ),
    (
        "WIC",
        {
            "word": "bank",
            "sentence1": "The bank is closed.",
            "sentence2": "We sat on the bank.",
            "label": 0,
            "idx": 0,
            "start1": 4,
            "end1": 8,
            "start2": 14,
            "end2": 18,
        },
        [
            'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
            "The bank is closed.\nWe sat on the bank.\nNo",
            'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
            "The bank is closed.\nWe sat on the bank.\nYes",
        ],
        0,
    ),
    (
        "WSC",
        {
            "text": "Mark told Pete many lies about himself. It was a bad habit.",
            "span1_text": "Pete",
            "span2_text": "It",
            "span1_index": 2,
            "span2_index": 7,
            "label": 0,
            "idx": 0,
        },
        [
            "Mark told Pete many lies about himself. It was a bad habit.\n"
            'In the previous sentence, does the pronoun "it" refer to Pete? Yes or No?\nNo',
            "Mark told Pete many lies about himself. It was a bad habit.\n"
            'In the previous sentence, does the pronoun "it" refer to Pete? Yes or No?\nYes',
        ],
        0,
    ),
    (
        "Copa",
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The sun was rising.",
            "choice2": "The grass was cut.",
            "question": "cause",
            "label": 0,
            "idx": 0,
        },
        [
            "My body cast a shadow over the grass because the sun was rising.",
            "My body cast a shadow over the grass because the grass was cut.",
        ],
        0,
    ),
    (
        "Copa",
        {
            "premise": "The ball rolled into the street. ",
            "choice1": "A car stopped.",
            "choice2": "I picked it up.",
            "question": "effect",
            "label": 1,
            "idx": 1,
        },
        [
            "The ball rolled into the street so a car stopped.",
            "The ball rolled into the street so I picked it up.",
        ],
        1,
    ),
    (
        "ReCoRD",
        {
            "passage": (
                "Rain fell all day.\n@highlight\nA storm hit Leeds\n@highlight\nRoads closed"
            ),
            "query": "Schools in @placeholder stayed shut.",
            "entities": ["Leeds", "York"],
            "answers": ["Leeds"],
            "idx": {"passage": 0, "query": 0},
        },
        [
            "Rain fell all day.\n- A storm hit Leeds\n- Roads closed\n"
            "- Schools in Leeds stayed shut.",
            "Rain fell all day.\n- A storm hit Leeds\n- Roads closed\n"
            "- Schools in York stayed shut.",
        ],
        0,
    ),
]


def _sample(task, row):
    return task.build(row, "test")


@pytest.mark.parametrize("name,row,expected,correct", OPT_CASES, ids=[c[0] for c in OPT_CASES])
def test_opt_prompts(name, row, expected, correct):
    task = get_task(name, family="opt")
    sample = _sample(task, row)
    prompts, unverbalized, verbalized = data.prompt_texts(task, [], sample)
    assert prompts == expected
    assert verbalized == expected  # no demonstrations: the prompt is the verbalized sample

    # option_len = len(enc(verbalized)) - len(enc(unverbalized)), from the reference strings
    tok = opt_tokenizer()
    enc = data.encode_prompt(task, [], sample, tok)
    base = len(tok.encode(unverbalized))
    assert enc.option_len == [len(tok.encode(e)) - base for e in expected]
    # BOS id 0
    assert enc.input_ids == [[0] + tok.encode(e, add_special_tokens=False) for e in expected]
    assert enc.correct[0] == correct


def test_unverbalized_prompts():
    """encode(...).strip(' '): trailing newlines survive, trailing spaces do not (Copa)."""
    rte = get_task("opt/RTE")
    sample = _sample(rte, OPT_CASES[1][1])
    assert (
        data.prompt_texts(rte, [], sample)[1]
        == 'Dana Reeve died in 2006.\nDoes this mean that "Reeve is dead." is true? Yes or No?\n'
    )
    copa = get_task("Copa")
    assert (
        data.prompt_texts(copa, [], _sample(copa, OPT_CASES[8][1]))[1]
        == "My body cast a shadow over the grass because"
    )
    record = get_task("ReCoRD")
    assert (
        data.prompt_texts(record, [], _sample(record, OPT_CASES[10][1]))[1]
        == "Rain fell all day.\n- A storm hit Leeds\n- Roads closed\n-"
    )


def test_record_correct_is_any_answer():
    task = get_task("ReCoRD")
    row = dict(OPT_CASES[10][1], entities=["Leeds", "Rain", "York"], answers=["Leeds", "York"])
    enc = data.encode_prompt(task, [], _sample(task, row), opt_tokenizer())
    assert enc.correct == [0, 2]


SQUAD_ROW = {
    "id": "q1",
    "title": "Glacier",
    "context": "A glacier is dense ice.",
    "question": " What is a glacier? ",
    "answers": {"text": ["dense ice", "ice"], "answer_start": [13, 19]},
}
DROP_ROW = {
    "section_id": "s",
    "query_id": "q",
    "passage": "The Bears scored 14.",
    "question": "How many? ",
    "answers_spans": {"spans": ["14"], "types": ["number"]},
}


@pytest.mark.parametrize(
    "name,row,prompt,answer,gold",
    [
        (
            "SQuAD",
            SQUAD_ROW,
            "Title: Glacier\nContext: A glacier is dense ice.\n"
            "Question: What is a glacier?\nAnswer:",
            " dense ice\n",
            ["dense ice", "ice"],
        ),
        (
            "DROP",
            DROP_ROW,
            "Passage: The Bears scored 14.\nQuestion: How many?\nAnswer:",
            " 14\n",
            ["14"],
        ),
    ],
)
def test_generation_prompts(name, row, prompt, answer, gold):
    task, tok = get_task(name), opt_tokenizer()
    sample = _sample(task, row)
    # inference: prompt only
    assert data.prompt_texts(task, [], sample)[0] == [prompt]
    assert data.prompt_texts(task, [], sample, generation_with_gold=True)[0] == [prompt + answer]
    enc = data.encode_prompt(task, [], sample, tok, generation_with_gold=True)
    # answer + "\n"
    assert enc.option_len == [len(tok.encode(prompt + answer)) - len(tok.encode(prompt))]
    assert enc.gold == gold and enc.correct == [0]
    inference = data.encode_prompt(task, [], sample, tok)
    assert inference.option_len == [0] and inference.input_ids == [
        [0] + tok.encode(prompt, add_special_tokens=False)
    ]
    # non-differentiable training prompt = the gold encoding without its answer tokens
    batch = data.collate([enc], "prompt", tok.pad_token_id)
    row0 = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row0 == inference.input_ids[0] and batch["gold"] == [enc.gold]


def test_icl_demonstrations():
    """demos: verbalize(d, d.correct).strip(), joined by "\\n\\n", then "\\n\\n" + the sample."""
    task = get_task("SST2")
    demos = [
        _sample(task, {"sentence": "a great film ", "label": 1, "idx": 1}),
        _sample(task, {"sentence": "dull and long", "label": 0, "idx": 2}),
    ]
    sample = _sample(task, {"sentence": "i loved it", "label": 1, "idx": 3})
    prompts, _, _ = data.prompt_texts(task, demos, sample)
    assert prompts == [
        "a great film It was great\n\ndull and long It was terrible\n\ni loved it It was terrible",
        "a great film It was great\n\ndull and long It was terrible\n\ni loved it It was great",
    ]
    squad = get_task("SQuAD")
    demo = _sample(squad, SQUAD_ROW)
    prompts, _, _ = data.prompt_texts(
        squad, [demo, demo], _sample(squad, dict(SQUAD_ROW, question="Why?"))
    )
    shown = (
        "Title: Glacier\nContext: A glacier is dense ice.\n"
        "Question: What is a glacier?\nAnswer: dense ice"
    )
    assert prompts == [
        f"{shown}\n\n{shown}\n\n"
        "Title: Glacier\nContext: A glacier is dense ice.\nQuestion: Why?\nAnswer:"
    ]


def test_sfc_prompts():
    sst2 = get_task("SST2")
    sample = _sample(sst2, {"sentence": "i loved it", "label": 1, "idx": 3})
    demo = _sample(sst2, {"sentence": "a great film", "label": 1, "idx": 1})
    assert data.prompt_texts(sst2, [demo], sample, sfc=True)[:2] == (
        ["It was terrible", "It was great"],
        "It was",
    )
    assert data.prompt_texts(sst2, [demo], sample, icl_sfc=True)[0] == [
        "a great film It was great\n\nIt was terrible",
        "a great film It was great\n\nIt was great",
    ]
    copa = get_task("Copa")
    prompts, unverbalized, _ = data.prompt_texts(copa, [], _sample(copa, OPT_CASES[8][1]), sfc=True)
    assert (prompts, unverbalized) == (
        ["because the sun was rising.", "because the grass was cut."],
        "because",
    )
    record = get_task("ReCoRD")
    prompts, unverbalized, _ = data.prompt_texts(
        record, [], _sample(record, OPT_CASES[10][1]), sfc=True
    )
    assert (prompts, unverbalized) == (
        ["- Schools in Leeds stayed shut.", "- Schools in York stayed shut."],
        "-",
    )
    rte = get_task("opt/RTE")
    assert data.prompt_texts(rte, [], _sample(rte, OPT_CASES[1][1]), sfc=True)[:2] == (
        ["Yes", "No"],
        "",
    )
    with pytest.raises(data.DataError):
        data.prompt_texts(get_task("SQuAD"), [], _sample(get_task("SQuAD"), SQUAD_ROW), sfc=True)


def test_bos_override_and_left_truncation():
    task, tok = get_task("SST2"), opt_tokenizer()
    demos = [
        _sample(task, {"sentence": f"demo number {i} was fine", "label": i % 2, "idx": i})
        for i in range(6)
    ]
    sample = _sample(task, {"sentence": "i loved it", "label": 1, "idx": 9})
    full = data.encode_prompt(task, demos, sample, tok)
    # the original's bos_token_id = 0
    assert all(s[0] == 0 for s in full.input_ids)
    own = data.encode_prompt(task, demos, sample, tok, bos_override=False)
    # the tokenizer's own BOS </s>
    assert [s[0] for s in own.input_ids] == [2, 2]
    assert [s[1:] for s in own.input_ids] == [s[1:] for s in full.input_ids]
    cut = data.encode_prompt(task, demos, sample, tok, max_length=12)
    assert (
        cut.input_ids == [s[:1] + s[-11:] for s in full.input_ids]
        and cut.option_len == full.option_len
    )
    squad = get_task("SQuAD")
    long = data.encode_prompt(
        squad,
        [_sample(squad, SQUAD_ROW)] * 3,
        _sample(squad, SQUAD_ROW),
        tok,
        max_length=30,
        max_new_tokens=10,
    )
    # max_length - max_new_tokens
    assert len(long.input_ids[0]) == 20 and long.input_ids[0][0] == 0
    # no BOS: keep the last max_length
    tok.add_bos_token = False
    plain = data.encode_prompt(task, demos, sample, tok, max_length=12)
    assert plain.input_ids == [s[-12:] for s in full.input_ids]


# RoBERTa (LM-BFF): expected text from the templates of §7.3, ids from the template semantics.
def test_roberta_sst_templates():
    tok = roberta_tokenizer()
    for name, label, word in (("SST-2", "1", "great"), ("sst-5", 3, "good")):
        task = get_task(name, family="roberta")
        sample = Sample(
            {"text_a": "a charming journey .", "text_b": None}, list(task.labels), label
        )
        assert task.render(sample) == "<s>a charming journey . It was<mask>.</s>"
        enc = task.encode(sample, tok)
        expected = (
            [0]
            + tok.encode("a charming journey .", False)
            + tok.encode(" It was", False)
            + [4, tok.convert_tokens_to_ids("."), 2]
        )
        assert enc.input_ids == expected and enc.mask_pos == expected.index(4)
        assert enc.label_word_ids[enc.label] == tok.encode(" " + word, False)[0]
    sst5 = get_task("sst-5", family="roberta")
    assert sst5.label_word_ids(tok) == [
        tok.encode(" " + w, False)[0] for w in ("terrible", "bad", "okay", "good", "great")
    ]


@pytest.mark.parametrize("name", ["SNLI", "MNLI", "RTE"])
def test_roberta_nli_template(name):
    tok, task = roberta_tokenizer(), get_task(name, family="roberta")
    sample = Sample(
        {"text_a": "A man is sleeping.", "text_b": "Nobody sleeps."},
        list(task.labels),
        task.labels[0],
    )
    assert task.render(sample) == "<s>A man is sleeping?<mask>, nobody sleeps.</s>"
    enc = task.encode(sample, tok)
    assert enc.input_ids == [0] + tok.encode("A man is sleeping", False) + [
        tok.convert_tokens_to_ids("?"),
        4,
        tok.convert_tokens_to_ids(","),
    ] + tok.encode(" nobody sleeps.", False) + [2]
    words = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe", "not_entailment": "No"}
    assert task.label_word_ids(tok) == [
        tok.encode(" " + words[lab], False)[0] for lab in task.labels
    ]
    assert task.max_seq_length == 256


def test_roberta_trec_template_and_limits():
    tok, trec = roberta_tokenizer(), get_task("trec")
    sample = Sample({"text_a": "What is NASA short for ?", "text_b": None}, list(trec.labels), 2)
    assert trec.render(sample) == "<s><mask>: What is NASA short for ?</s>"
    enc = trec.encode(sample, tok)
    assert enc.input_ids == [0, 4, tok.convert_tokens_to_ids(":")] + tok.encode(
        " What is NASA short for ?", False
    ) + [2]
    long_text = " ".join(["word"] * 300)
    enc = trec.encode(Sample({"text_a": long_text, "text_b": None}, list(trec.labels), 0), tok)
    assert enc.input_ids == [0, 4, tok.convert_tokens_to_ids(":")] + tok.encode(
        " " + long_text, False
    )[:110] + [2]
    sst5 = get_task("sst-5")
    enc = sst5.encode(Sample({"text_a": long_text, "text_b": None}, list(sst5.labels), 0), tok)
    assert enc.input_ids[1:111] == tok.encode(long_text, False)[:110]
    assert len(enc.input_ids) == 1 + 110 + len(tok.encode(" It was", False)) + 3
    mnli = get_task("MNLI")
    enc = mnli.encode(
        Sample({"text_a": long_text + ".", "text_b": "Short."}, list(mnli.labels), "neutral"), tok
    )
    assert enc.input_ids[1:241] == tok.encode(long_text, False)[:240] and enc.mask_pos == 242
    # SST-2 has no sentence limit: tail cut at 128
    with pytest.raises(data.DataError, match="<mask> cut off"):
        get_task("SST-2", family="roberta").encode(
            Sample({"text_a": long_text, "text_b": None}, ["0", "1"], "0"), tok
        )
