"""The facts dataset: loading with schema checks, the answer's first token, and the words related
to each subject (tokenizer only; no model is run here).

Introduced in chapter 2 ("Dissecting factual recall"); chapter 3 reuses it to measure knowledge
before and after further pretraining (which facts a model knows is
:func:`lmbook.experiments.recall.known_mask`). The schema is documented in ``data/facts/README.md``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from lmbook.core import tokens
from lmbook.core.params import ParameterError, check_file, read_jsonl

__all__ = ["Fact", "load_facts", "load_descriptions", "first_words", "answer_token_ids", "STOPWORDS",
           "related_token_sets", "word_pieces"]

FACT_FIELDS = {"id": str, "relation": str, "subject": str, "template": str, "prompt": str, "attribute": str}


@dataclasses.dataclass(frozen=True)
class Fact:
    id: str
    relation: str
    subject: str
    template: str
    prompt: str
    attribute: str  # without the leading space; the model sees " " + attribute after the prompt


def load_facts(path: str | Path = "data/facts/facts.jsonl", name: str = "FACTS_PATH") -> list[Fact]:
    """Read and validate a facts file (JSON lines; fields in ``data/facts/README.md``).

    Every problem is reported with the file and line: a missing or extra field, a field of the
    wrong type, a prompt that is not ``template.format(subject)``, a subject that does not occur
    in its prompt, an attribute with surrounding spaces, a duplicate id.
    """
    import string

    path = check_file(name, path)
    facts, seen = [], {}
    for lineno, rec in read_jsonl(path, name):
        where = f"{name} {path}, line {lineno}"
        missing = set(FACT_FIELDS) - set(rec)
        extra = set(rec) - set(FACT_FIELDS)
        if missing or extra:
            raise ParameterError(f"{where}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}; "
                                 f"expected exactly {list(FACT_FIELDS)}")
        for key, typ in FACT_FIELDS.items():
            if not isinstance(rec[key], typ) or not rec[key].strip():
                raise ParameterError(f"{where}: field {key!r} must be a non-empty string, got {rec[key]!r}")
        try:  # exactly one placeholder, "{}": "{} in {region}" or a lone "{" is reported, not raised as KeyError
            fields = [f for _, f, _, _ in string.Formatter().parse(rec["template"]) if f is not None]
        except ValueError as e:
            fields = [f"<{e}>"]
        if fields != [""]:
            raise ParameterError(f"{where}: template {rec['template']!r} must contain exactly one placeholder '{{}}' "
                                 f"(for the subject) and no other braces; found {fields}")
        if rec["template"].format(rec["subject"]) != rec["prompt"]:
            raise ParameterError(f"{where}: prompt {rec['prompt']!r} is not template.format(subject) "
                                 f"for template {rec['template']!r} and subject {rec['subject']!r}")
        if rec["attribute"] != rec["attribute"].strip():
            raise ParameterError(f"{where}: attribute {rec['attribute']!r} has surrounding whitespace")
        if rec["prompt"] != rec["prompt"].rstrip():
            raise ParameterError(f"{where}: prompt ends with whitespace; the answer's leading space belongs to "
                                 "the answer")
        if rec["id"] in seen:
            raise ParameterError(f"{where}: duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
        seen[rec["id"]] = lineno
        facts.append(Fact(**{k: rec[k] for k in FACT_FIELDS}))
    if not facts:
        raise ParameterError(f"{name} {path}: the file holds no facts")
    return facts


def load_descriptions(path: str | Path = "data/facts/subjects.jsonl",
                      name: str = "DESCRIPTIONS_PATH") -> dict[str, str]:
    """``{subject: description}`` from a JSON-lines file of ``{"subject", "description"}`` records."""
    path = check_file(name, path)
    out: dict[str, str] = {}
    for lineno, rec in read_jsonl(path, name):
        if set(rec) != {"subject", "description"} or not all(isinstance(v, str) and v.strip() for v in rec.values()):
            raise ParameterError(f"{name} {path}, line {lineno}: expected non-empty string fields 'subject' "
                                 "and 'description'")
        if rec["subject"] in out:
            raise ParameterError(f"{name} {path}, line {lineno}: duplicate subject {rec['subject']!r}")
        out[rec["subject"]] = rec["description"]
    if not out:
        raise ParameterError(f"{name} {path}: the file holds no descriptions")
    return out


def first_words(descriptions: dict[str, str], n_words: int) -> dict[str, str]:
    """Each description cut to its first ``n_words`` words (split on white space). Chapter 2 builds the
    related-word sets from cut descriptions to show how the attributes rate grows with their length."""
    from lmbook.core.params import check_int

    check_int("n_words", n_words, 1)
    return {s: " ".join(d.split()[:n_words]) for s, d in descriptions.items()}


def answer_token_ids(model, facts: Sequence[Fact]) -> torch.Tensor:
    """Each fact's target token, ``[N]``: :func:`lmbook.core.tokens.answer_token_ids` of its attribute
    (``model``: a model or its tokenizer). Chapter 2's target token for every experiment."""
    return tokens.answer_token_ids(model, [f.attribute for f in facts])


# A short stop-word list written for this book (function words, auxiliaries, pronouns), used to
# keep only content tokens in the attributes-rate measure of chapter 2.
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under until up very was we
    were what when where which while who whom why will with would you your yours yourself yourselves one two
    known well many much first second new old its became become made make best""".split()
)

_WORD = re.compile(r"[^\W\d_][\w'-]*", re.UNICODE)


def _norm(token_text: str) -> str:
    return token_text.strip().lower()


def word_pieces(model, word: str) -> set[str]:
    """The word itself and the texts (stripped, lower-cased) of the model's tokens for it, with and
    without a leading space, so that a sub-word token such as " Par" of " Paris" can match, as in
    Geva et al.'s token-level sets."""
    tok = getattr(model, "tokenizer", model)
    ids = tok(" " + word, add_special_tokens=False)["input_ids"] + tok(word, add_special_tokens=False)["input_ids"]
    return {_norm(tok.decode([i])) for i in ids} | {word.lower()}


def related_token_sets(model, facts: Sequence[Fact], descriptions: dict[str, str]) -> dict[str, frozenset[str]]:
    """Per subject, the set of content words related to it (lower-cased strings), for the
    attributes rate of chapter 2.

    The set holds the words of the subject's description and every attribute the dataset holds for
    that subject, minus stop words, words of two characters or fewer, and the subject's own words
    (a projection that merely repeats the subject's name is not an attribute). Geva et al. (2023)
    built the same kind of set from Wikipedia paragraphs about each subject. A top token of a
    projection counts as related when its stripped, lower-cased text is in the set.
    """
    by_subject: dict[str, set[str]] = {}
    for f in facts:
        if f.subject not in descriptions:
            raise ParameterError(f"no description for subject {f.subject!r} (fact {f.id}); "
                                 "add it to the descriptions file")
        words = by_subject.setdefault(f.subject, set())
        words.update(w.lower() for w in _WORD.findall(descriptions[f.subject]))
        words.update(w.lower() for w in _WORD.findall(f.attribute))

    def pieces(word: str) -> set[str]:
        return word_pieces(model, word)

    def content(items: set[str]) -> set[str]:
        return {w for w in items if len(w) > 2 and w not in STOPWORDS}

    out = {}
    for subject, words in by_subject.items():
        own = set()
        for w in _WORD.findall(subject):
            own |= pieces(w.lower()) | pieces(w)
        related = set()
        for w in words:
            related |= pieces(w)
        out[subject] = frozenset(content(related) - own)
    return out
