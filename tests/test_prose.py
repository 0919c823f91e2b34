"""The prose check: a chapter's markdown names no model it could have been run on and quotes no number outside a
glue role, so every outcome it states comes from the run that rendered it (claims, lmbook.core.claims).

What is not prose is skipped: code blocks and directives, inline code, and roles ({glue:...}, {cite}, {numref}).
What must stay typed is listed in ALLOWED, phrase by phrase: what a paper reports and method text.
"""

import json
import re

import pytest

from conftest import ROOT

CHECKED = ["01_tour", "02_factual_recall", "03_perplexity", "04_activation_addition", "05_refusal_direction",
           "06_task_vectors", "07_vector_arithmetic"]

MODEL_NAMES = re.compile(r"gemma|smol\s*lm|qwen|llama|mistral|pythia", re.IGNORECASE)  # models the book can run
NUMBER = re.compile(r"(?<![\w.\-−])[−-]?\d+(?:[.,]\d+)?%?(?!\w|[.,]\d|-)")
CHAPTER_REF = re.compile(r"\bchapters? \d+(?: and \d+)?", re.IGNORECASE)  # "chapter 2": a cross-reference

ALLOWED = {  # phrases that stay typed, removed before the check
    "01_tour": [
        "because Gemma 3 normalises each sublayer's\noutput once more before adding it",  # method: the architecture
    ],
    "02_factual_recall": [
        "(as in Gemma 3)", "(95% interval",  # method: the architecture, the interval
        # what the papers report (Geva et al., Meng et al.)
        "after layer 40 of 48", "GPT-2 XL (48 layers) and GPT-J (28 layers)",
        "(1.5B parameters, 48 layers) and GPT-J (6B, 28 layers)",
    ],
    "03_perplexity": [
        "gradient norm clipped to 1", "the 95% interval over",  # method
    ],
    "04_activation_addition": [  # what the paper reports (Turner et al.)
        "GPT-2 XL (48 layers", "layer 6 with coefficient 5", "layer 20 with coefficient 4",
        "temperature 1, top-p 0.3 and a frequency penalty of 1",
    ],
    "05_refusal_direction": [
        "The interval is a 95% Wilson interval",  # method
    ],
    "06_task_vectors": [
        "Gemma 3 also normalises the attention output",  # method: the architecture
        # what the papers report (Hendel et al., Todd et al.)
        "on 18 tasks", "Pythia 2.8B, the smallest model they test, and LLaMA 7B",
        "GPT-J (6B) and Llama 2 (7B to 70B) and sum the top 10", "in GPT-J and Llama 2",
    ],
    "07_vector_arithmetic": [
        "Gemma 3 normalises the MLP's output again",  # method: the architecture
        # what the paper reports (Merullo et al.)
        "GPT-2 Medium (24 layers)", "from layer 15", "from layer 19",
        "layers 19 (capitals), 18 (past tense) and 19 (upper-casing)", "13, 19 and 25 of GPT-J's 28 layers",
        "relative depth 0.48 to\n0.93", "from layer 18 to the last (23)", "every layer from 18 to the last",
        "only about 8% of the time",  # the demo's note on the past-tense vector
    ],
}


def prose(text: str) -> str:
    """Markdown without code blocks, directives, inline code and roles."""
    text = re.sub(r"^(`{3,}|~{3,}).*?^\1", " ", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"\{[\w:-]*\}`[^`]*`", " ", text)  # roles: {glue:}`x`, {cite}`y`, {numref}`z`
    text = re.sub(r"`[^`]*`", " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)  # link targets


def problems(stem: str, text: str) -> list[str]:
    for phrase in ALLOWED.get(stem, []):
        text = text.replace(phrase, " ")
    text = CHAPTER_REF.sub(" ", prose(text))
    found = [f"names a model: {m.group()!r}" for m in MODEL_NAMES.finditer(text)]
    found += [f"quotes a number outside a glue role: {m.group()!r} in "
              f"{text[max(0, m.start() - 40):m.end() + 20]!r}" for m in NUMBER.finditer(text)]
    return found


def markdown(stem: str) -> str:
    nb = json.loads((ROOT / "chapters" / f"{stem}.ipynb").read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("stem", CHECKED)
def test_prose_states_no_outcome_by_hand(stem):
    found = problems(stem, markdown(stem))
    assert not found, f"{stem}: " + "; ".join(found)


@pytest.mark.parametrize("stem", CHECKED)
def test_allow_list_is_used(stem):
    """An allowed phrase that no longer occurs is dropped from ALLOWED, so the list stays short."""
    text = markdown(stem)
    assert [p for p in ALLOWED.get(stem, []) if p not in text] == []


@pytest.mark.parametrize("text, bad", [
    ("In Gemma the answer appears late.", True), ("SmolLM2 fails.", True), ("at layer 12 of the model", True),
    ("a share of 0.93", True), ("−1 means none", True), ("in 30% of prompts", True),
    ("at layer {glue:text}`rel1_layer`", False), ("{glue:}`claim_x` see {numref}`fig-1`", False),
    ("GPT-2 and word2vec, top-1", False), ("as chapter 2 shows", False), ("`N_ITEMS=0` and ```\nx = 3\n```", False),
    ("models of 124M to 1.5B parameters", False),
])
def test_the_check_itself(text, bad):
    assert bool(problems("none", text)) == bad
