"""OPT prompt templates, as the original's `large_models/templates.py`.

A template is split into the prompt (the original's `encode`: the input without the answer) and
the option (what `verbalize` appends for one candidate), so `verbalize = prompt + option` holds
by construction for every task. SFC calibration (`--sfc`, Holtzman et al. 2021) swaps the prompt
for `sfc_prompt` and keeps the same option. Every f-string below is the original's, byte for
byte; `encode_prompt` (data/encode.py) strips the spaces at the ends, as the original does.

Templates read `sample.data`, which holds the Hugging Face dataset's fields (data/tasks.py).
"""

from . import DataError


class Template:
    verbalizer = None  # candidate -> answer word, for label-id candidates

    def prompt(self, d):
        raise NotImplementedError

    def option(self, d, candidate):
        return self.verbalizer[candidate]

    def sfc_prompt(self, d):
        return ""

    # The original's four method names, on Sample objects.
    def encode(self, sample):
        return self.prompt(sample.data)

    def verbalize(self, sample, candidate):
        return self.prompt(sample.data) + self.option(sample.data, candidate)

    def encode_sfc(self, sample):
        return self.sfc_prompt(sample.data)

    def verbalize_sfc(self, sample, candidate):
        return self.sfc_prompt(sample.data) + self.option(sample.data, candidate)


class SST2Template(Template):
    verbalizer = {0: "terrible", 1: "great"}

    def prompt(self, d):
        return f"{d['sentence'].strip()} It was"

    def option(self, d, candidate):
        return f" {self.verbalizer[candidate]}"

    def sfc_prompt(self, d):
        return " It was"


class RTETemplate(Template):
    verbalizer = {0: "Yes", 1: "No"}

    def prompt(self, d):
        return f'{d["premise"]}\nDoes this mean that "{d["hypothesis"]}" is true? Yes or No?\n'


class CBTemplate(Template):
    verbalizer = {0: "Yes", 1: "No", 2: "Maybe"}

    def prompt(self, d):
        return f'Suppose {d["premise"]} Can we infer that "{d["hypothesis"]}"? Yes, No, or Maybe?\n'


class BoolQTemplate(Template):
    """The original's default `BoolQTemplateV3` (template_version=2): a real newline before the
    answer."""

    def prompt(self, d):
        question = d["question"]
        if not question.endswith("?"):
            question = question + "?"
        question = question[:1].upper() + question[1:]
        return f"{d['passage']} {question}\n"

    def option(self, d, candidate):
        return candidate  # candidates are the words "Yes" / "No"


class MultiRCTemplate(Template):
    verbalizer = {0: "No", 1: "Yes"}

    def prompt(self, d):
        return (
            f"{d['paragraph']}\nQuestion: {d['question']}\n"
            f'I found this answer "{d["answer"]}". Is that correct? Yes or No?\n'
        )


class WICTemplate(Template):
    verbalizer = {0: "No", 1: "Yes"}

    def prompt(self, d):
        return (
            f'Does the word "{d["word"]}" have the same meaning in these two sentences? Yes, No?\n'
            f"{d['sentence1']}\n{d['sentence2']}\n"
        )


class WSCTemplate(Template):
    verbalizer = {0: "No", 1: "Yes"}

    def prompt(self, d):
        return (
            f'{d["text"]}\nIn the previous sentence, does the pronoun "{d["span2_text"].lower()}" '
            f"refer to {d['span1_text']}? Yes or No?\n"
        )


class CopaTemplate(Template):
    """`CopaTemplate` with capitalization="correct": the candidate's first word is lower-cased
    unless "I"."""

    def _conjunction(self, d):
        return {"effect": " so ", "cause": " because "}[d["question"]]

    def prompt(self, d):
        premise = d["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        return premise + self._conjunction(d)

    def option(self, d, candidate):
        words = candidate.split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return " ".join(words)

    def sfc_prompt(self, d):
        # Original: encode_sfc = conj.strip(), verbalize_sfc = conj.strip() + " " + option.
        return self._conjunction(d).lstrip()


class ReCoRDTemplate(Template):
    """`ReCoRDTemplateGPT3`: the option is the whole query sentence with the entity filled in."""

    def prompt(self, d):
        return d["passage"].replace("@highlight\n", "- ") + "\n-"

    def option(self, d, candidate):
        entity = candidate[0] if isinstance(candidate, list) else candidate
        return " " + d["query"].replace("@placeholder", entity)

    def sfc_prompt(self, d):
        return "-"


class _GenerationTemplate(Template):
    """SQuAD / DROP: the option is always the first gold answer plus "\\n" (the candidate is
    ignored)."""

    def option(self, d, candidate):
        return f" {d['answers'][0]}\n"

    def sfc_prompt(self, d):
        raise DataError("SFC calibration is not defined for generation tasks (--sfc)")


class SQuADTemplate(_GenerationTemplate):
    """`SQuADv2Template`."""

    def prompt(self, d):
        return (
            f"Title: {d['title']}\nContext: {d['context']}\n"
            f"Question: {d['question'].strip()}\nAnswer:"
        )


class DROPTemplate(_GenerationTemplate):
    def prompt(self, d):
        return f"Passage: {d['context']}\nQuestion: {d['question'].strip()}\nAnswer:"
