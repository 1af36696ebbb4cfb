"""RoBERTa tasks with LM-BFF prompts (the original's `medium_models/src/dataset.py` and
`processors.py`).

A template is LM-BFF's `*`-separated string from `run_fewshot.sh`. Its parts:
  cls / mask / sep / sep+   the special tokens <s>, <mask>, </s> sent_i                    sentence
  i;  `+` in front adds a space, `l`/`u` after "sent" lower/upper-
                            cases the first character, `-` before "_i" drops the last character
  anything else             literal text with `_` for spaces; a single character is looked up with
                            `convert_tokens_to_ids` (not tokenized), as LM-BFF does
The sentence parts are cut to `first_sent_limit` (sentence 0) / `other_sent_limit` tokens, then the
whole sequence to `max_seq_length`, keeping the head. A label word is `" " + word`, one BPE token.
Prompt-only fine-tuning: no demonstrations (`few_shot_type=prompt`).
"""

import re
from dataclasses import dataclass

from . import SAMPLES_DIR, DataError, kshot
from .readers import split_tsv
from .tasks import Sample

_SENTENCE = re.compile(r"^(\+?)sent([lu]?)(-?)_(\d+)$")
_SPECIAL = {"cls": "<s>", "mask": "<mask>", "sep": "</s>", "sep+": "</s>"}


@dataclass(frozen=True)
class MLMEncoded:
    input_ids: list
    mask_pos: int
    label: int  # index into the task's labels
    label_word_ids: list  # vocabulary id of each label's word, in label order


@dataclass(frozen=True)
class MLMTask:
    # LM-BFF spelling (its data directory): SST-2, sst-5, SNLI, MNLI, RTE, trec
    name: str
    template: str
    labels: tuple  # the processor's get_labels() order: logits and label ids follow it
    label_words: dict  # label -> word (run_fewshot.sh MAPPING)
    text_columns: tuple = ()  # GLUE TSV columns of the sentences (CSV tasks: label,text)
    label_column: int = -1
    csv: bool = False
    max_seq_length: int = 128
    first_sent_limit: int | None = None
    other_sent_limit: int | None = None
    # MNLI: dev_matched.tsv in k-shot folders; test file is test_matched.tsv
    dev_name: str = "dev"
    original_eval: tuple = ("dev",)  # original GLUE files that become test*.tsv
    family: str = "roberta"
    metric: str = "accuracy"
    generation: bool = False

    @property
    def key(self):
        return self.name.lower().replace("-", "")

    def load(self, data_dir=None, k=16, seed=42):
        """-> {"train", "dev", "test"} Samples of the k-shot split (see data/kshot.py for the
        lookup)."""
        records = kshot.load_records(self, data_dir or SAMPLES_DIR, k, seed)
        return {
            split: [self.sample(where, raw) for where, raw in rows]
            for split, rows in records.items()
        }

    def sample(self, where, raw):
        """One row (a GLUE TSV line, or CSV fields) -> Sample with text_a/text_b, as the
        processors."""
        if self.csv:
            if len(raw) < 2:
                raise DataError(f"expected label,text columns, got {len(raw)} ({where})")
            label, texts = kshot.csv_label(raw, where), (raw[1],)
        else:
            # label after texts
            last = max(self.text_columns) + 1 if self.label_column == -1 else self.label_column
            fields = split_tsv(where, raw, max(max(self.text_columns), last) + 1)
            label, texts = fields[self.label_column], tuple(fields[c] for c in self.text_columns)
        if label not in self.labels:
            raise DataError(
                f"unknown label {label!r}, expected one of {list(self.labels)} ({where})"
            )
        data = {"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None}
        return Sample(data=data, candidates=list(self.labels), correct_candidate=label, where=where)

    def _pieces(self, sample):
        """The template as (kind, value, sentence id) pieces: special / text / char."""
        sentences = [sample.data["text_a"], sample.data["text_b"]]
        for part in self.template.split("*"):
            m = _SENTENCE.match(part)
            if part in _SPECIAL:
                yield "special", part, None
            elif m:
                space, case, drop_last, i = m.groups()
                text = sentences[int(i)]
                if text is None:
                    raise DataError(f"template part *{part}* needs sentence {i} ({sample.where})")
                if case:
                    text = (text[:1].lower() if case == "l" else text[:1].upper()) + text[1:]
                if drop_last:
                    text = text[:-1]
                yield "text", (" " + text) if space else text, int(i)
            elif part:
                text = part.replace("_", " ")
                yield ("char" if len(text) == 1 else "text"), text, None

    def render(self, sample):
        """The prompt as text (no truncation), e.g. "<s>a fine film It was<mask>.</s>"; for
        inspection."""
        return "".join(
            _SPECIAL[v] if kind == "special" else v for kind, v, _ in self._pieces(sample)
        )

    def label_word_ids(self, tokenizer):
        ids = []
        for label in self.labels:
            word = " " + self.label_words[label]
            tokens = tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) != 1:
                raise DataError(
                    f"label word {word!r} is {len(tokens)} tokens, LM-BFF needs one (tokenizer)"
                )
            ids.append(tokens[0])
        return ids

    def encode(self, sample, tokenizer):
        special = {
            "cls": tokenizer.bos_token_id,
            "mask": tokenizer.mask_token_id,
            "sep": tokenizer.eos_token_id,
            "sep+": tokenizer.eos_token_id,
        }
        if special["mask"] is None:
            raise DataError(f"the tokenizer has no mask token, {self.name} needs one (tokenizer)")
        ids = []
        for kind, value, sent_id in self._pieces(sample):
            if kind == "special":
                ids.append(special[value])
            elif kind == "char":
                ids.append(tokenizer.convert_tokens_to_ids(value))
            else:
                new = tokenizer.encode(value, add_special_tokens=False)
                limit = self.first_sent_limit if sent_id == 0 else self.other_sent_limit
                ids += new[:limit] if sent_id is not None and limit is not None else new
        ids = ids[: self.max_seq_length]  # LM-BFF default: truncate the tail
        if special["mask"] not in ids:
            raise DataError(
                f"<mask> cut off by max_seq_length {self.max_seq_length} ({sample.where})"
            )
        return MLMEncoded(
            input_ids=ids,
            mask_pos=ids.index(special["mask"]),
            label=self.labels.index(sample.correct_candidate),
            label_word_ids=self.label_word_ids(tokenizer),
        )


_SST = "*cls**sent_0*_It_was*mask*.*sep+*"
_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
_NLI_WORDS = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}

MLM_TASKS = {
    t.name: t
    for t in (
        MLMTask(
            "SST-2",
            _SST,
            ("0", "1"),
            {"0": "terrible", "1": "great"},
            text_columns=(0,),
            label_column=1,
        ),
        MLMTask(
            "sst-5",
            _SST,
            (0, 1, 2, 3, 4),
            {0: "terrible", 1: "bad", 2: "okay", 3: "good", 4: "great"},
            csv=True,
            first_sent_limit=110,
            other_sent_limit=20,
        ),
        MLMTask(
            "SNLI",
            _NLI,
            ("contradiction", "entailment", "neutral"),
            _NLI_WORDS,
            text_columns=(7, 8),
            max_seq_length=256,
        ),
        MLMTask(
            "MNLI",
            _NLI,
            ("contradiction", "entailment", "neutral"),
            _NLI_WORDS,
            text_columns=(8, 9),
            max_seq_length=256,
            first_sent_limit=240,
            dev_name="dev_matched",
            original_eval=("dev_matched", "dev_mismatched"),
        ),
        MLMTask(
            "RTE",
            _NLI,
            ("entailment", "not_entailment"),
            {"not_entailment": "No", "entailment": "Yes"},
            text_columns=(1, 2),
            max_seq_length=256,
            first_sent_limit=240,
        ),
        MLMTask(
            "trec",
            "*cls**mask*:*+sent_0**sep+*",
            (0, 1, 2, 3, 4, 5),
            {
                0: "Description",
                1: "Entity",
                2: "Expression",
                3: "Human",
                4: "Location",
                5: "Number",
            },
            csv=True,
            first_sent_limit=110,
        ),
    )
}
