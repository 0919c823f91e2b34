"""Encoding prompts in batches, and finding where a substring sits among a prompt's tokens.

Introduced in chapter 1. Batches are **right-padded**: with causal attention a real token never
attends to the padding after it, so every real position computes exactly what it would alone,
and batched and one-at-a-time runs agree. Each row's last real token is at ``batch.last[i]``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lmbook.core.params import ParameterError

__all__ = ["Batch", "text_ids", "encode", "pad_ids", "left_padded", "pad_token_id", "adds_bos", "start_token_id",
           "token_span", "first_token_ids", "answer_token_ids", "decode_tokens"]


@dataclasses.dataclass
class Batch:
    """A right-padded batch. ``input_ids`` and ``attention_mask`` are ``[batch, seq]``;
    ``last`` is ``[batch]``, the index of each row's last real token; ``offsets`` holds each
    row's ``(start, end)`` character span per token (``None`` where the tokenizer has none)."""

    prompts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    offsets: list[list[tuple[int, int]]] | None

    def inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments a forward pass (or ``model.trace``) takes."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self) -> torch.Tensor:
        return torch.arange(len(self.prompts))

    def select(self, idx: Sequence[int]) -> "Batch":
        """The sub-batch of rows ``idx`` (padding trimmed to the longest kept row)."""
        idx = list(idx)
        width = int(self.last[idx].max()) + 1 if idx else 0
        return Batch(
            [self.prompts[i] for i in idx],
            self.input_ids[idx, :width],
            self.attention_mask[idx, :width],
            self.last[idx],
            None if self.offsets is None else [self.offsets[i] for i in idx],
        )


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)


def adds_bos(model_or_tokenizer) -> bool:
    """Whether the tokenizer puts a special token (its BOS) before every text it encodes."""
    tok = _tokenizer(model_or_tokenizer)
    with_special = tok("a")["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    return (len(with_special) > len(without) and with_special[-len(without):] == without
            and with_special[0] in tok.all_special_ids)


def pad_token_id(model_or_tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token, else 0.

    Written once for the whole library. A pad id of 0 is a real pad id (Gemma's), so the test is
    ``is None``, never truthiness."""
    tok = _tokenizer(model_or_tokenizer)
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def start_token_id(model_or_tokenizer) -> int | None:
    """The token every chapter puts before a text: ``None`` when the tokenizer adds its own BOS
    (Gemma), else ``<|endoftext|>`` where the vocabulary has it (the document separator of
    GPT-2-style pretraining data; SmolLM2's id 0), else the BOS or EOS token.

    Position 0 is the attention sink; a model whose tokenizer adds no BOS would otherwise make the
    first content token the sink. Interventions never touch this position (see
    :mod:`lmbook.mechanisms.interventions`)."""
    tok = _tokenizer(model_or_tokenizer)
    if adds_bos(tok):
        return None
    vocab = tok.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return tid
    raise ParameterError("the tokenizer has no BOS, EOS or <|endoftext|> token to start a text with")


def text_ids(model_or_tokenizer, text: str, start: bool = False) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens (its BOS, where it adds one); with
    ``start=True`` also :func:`start_token_id` first where the tokenizer adds no BOS, so that every
    text begins with a start token whatever the model."""
    tok = _tokenizer(model_or_tokenizer)
    sid = start_token_id(tok) if start else None
    ids = list(tok(text, add_special_tokens=sid is None)["input_ids"])
    return ids if sid is None else [sid] + ids


def encode(model_or_tokenizer, prompts: str | Sequence[str], start: bool = False) -> Batch:
    """Tokenise ``prompts`` (special tokens such as BOS added as the model expects), right-padded.

    ``start=True`` puts :func:`start_token_id` before each prompt where the tokenizer adds no BOS
    (chapters 2-7 do, so that position 0 is a start token and the attention sink for every model);
    its character offset is ``(0, 0)``."""
    tok = _tokenizer(model_or_tokenizer)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ParameterError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    prompts = list(prompts)
    sid = start_token_id(tok) if start else None
    enc = [tok(p, return_offsets_mapping=getattr(tok, "is_fast", False), add_special_tokens=sid is None)
           for p in prompts]
    head = [] if sid is None else [sid]
    batch = pad_ids(tok, prompts, [head + list(e["input_ids"]) for e in enc])
    if "offset_mapping" in enc[0]:
        batch.offsets = [[(0, 0)] * len(head) + list(map(tuple, e["offset_mapping"])) for e in enc]
    return batch


def pad_ids(model_or_tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]], side: str = "right") -> Batch:
    """A :class:`Batch` of already tokenised rows, padded on ``side`` with the tokenizer's pad token
    (its EOS token where it has none). With left padding, ``last`` is the final column for every row."""
    if side not in ("right", "left"):
        raise ParameterError(f"side must be 'right' or 'left', got {side!r}")
    tok = _tokenizer(model_or_tokenizer)
    width = max(map(len, ids))
    pad = pad_token_id(tok)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[i, sl] = torch.tensor(list(row), dtype=torch.long)
        mask[i, sl] = 1
    last = mask.sum(1) - 1 if side == "right" else torch.full((len(ids),), width - 1)
    return Batch(list(texts), input_ids, mask, last, None)


def left_padded(model_or_tokenizer, batch: Batch) -> Batch:
    """The rows of a right-padded ``batch`` re-padded on the left, so every row's last token is the
    last column (generation appends there; a cached prefix ends there)."""
    ids = [batch.input_ids[i, : int(batch.last[i]) + 1].tolist() for i in range(len(batch))]
    return pad_ids(model_or_tokenizer, batch.prompts, ids, side="left")


def token_span(batch: Batch, row: int, substring: str, occurrence: str = "last") -> tuple[int, int]:
    """Token indices ``[start, end)`` of the tokens that overlap ``substring`` in prompt ``row``.

    ``occurrence`` picks the ``"first"`` or ``"last"`` match when the substring occurs twice.
    Raises :class:`ParameterError` if the substring is absent.
    """
    prompt = batch.prompts[row]
    if batch.offsets is None:
        raise ParameterError("token_span needs a fast tokenizer (one that reports character offsets)")
    pos = prompt.rfind(substring) if occurrence == "last" else prompt.find(substring)
    if not substring or pos < 0:
        raise ParameterError(f"{substring!r} does not occur in the prompt {prompt!r}")
    lo, hi = pos, pos + len(substring)
    hits = [
        t for t, (s, e) in enumerate(batch.offsets[row][: int(batch.last[row]) + 1])
        if e > s and s < hi and e > lo
    ]
    if not hits:
        raise ParameterError(f"no token of the prompt {prompt!r} covers {substring!r} "
                             "(the tokenizer reports no offsets there)")
    return hits[0], hits[-1] + 1


def first_token_ids(model_or_tokenizer, words: Sequence[str]) -> torch.Tensor:
    """Id of the first token of each word as it would follow a prompt (no special tokens).

    Pass words with their leading space (``" Paris"``), as they appear after the prompt.
    """
    tok = _tokenizer(model_or_tokenizer)
    out = []
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ParameterError(f"the word {w!r} encodes to no tokens")
        out.append(ids[0])
    return torch.tensor(out, dtype=torch.long)


def answer_token_ids(model_or_tokenizer, answers: Sequence[str]) -> torch.Tensor:
    """The target token of each answer as it follows a prompt: the first token of ``" " + answer``,
    ``[N]``. Every chapter scores answers this way (facts' attributes, tasks' outputs)."""
    return first_token_ids(model_or_tokenizer, [" " + a for a in answers])


def decode_tokens(model_or_tokenizer, ids) -> list[str]:
    """Each id decoded on its own (so a reader sees token boundaries)."""
    tok = _tokenizer(model_or_tokenizer)
    return [tok.decode([int(i)]) for i in torch.as_tensor(ids).flatten()]
