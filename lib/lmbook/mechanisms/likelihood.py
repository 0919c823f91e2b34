"""How likely a model finds a text: the masked next-token loss, texts encoded for scoring, and the
loss of every token of a batch of texts.

Introduced in chapter 3 ("Perplexity pitfalls"), which scores texts token by token; chapter 4 (the
fluency cost of steering) and chapter 5 (the cost of ablating or adding a direction) use
:func:`logits_nll`, and :mod:`lmbook.mechanisms.training` trains on it.

Scoring a text. :func:`encode_texts` puts a start token in front of each text (the tokenizer's own
BOS where it adds one, else ``<|endoftext|>``, else BOS/EOS; see
:func:`lmbook.core.tokens.start_token_id`), and every token of the text is predicted from what
precedes it, so the scored tokens cover the text's bytes exactly once. :func:`token_nll` returns
the loss of each of those tokens from one nnsight trace per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int
from lmbook.core.tokens import Batch, pad_ids, text_ids
from lmbook.core.tokens import _tokenizer as _tok

__all__ = ["logits_nll", "Scored", "encode_texts", "as_batch", "length_batches", "token_nll"]


def logits_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
               chunk_elements: int = 1 << 20) -> torch.Tensor:
    """Next-token cross-entropy in nats: ``logits`` ``[B, T, V]`` predict ``input_ids[:, 1:]``;
    returns ``[B, T-1]`` with 0 where ``target_mask`` (``[B, T-1]``) is 0.

    Computed as ``logsumexp(z) - z[target]`` in float32 over chunks of about ``chunk_elements`` logits:
    no float32 copy of all the logits and no full log-softmax (most of the cost of scoring a 262k
    vocabulary); small chunks reuse the allocator's memory where large ones fault in fresh pages each
    time (a large share of a training step). Differentiable, so training uses it too."""
    B, T, V = logits.shape
    # all positions flattened (a view; the last one predicts nothing: target 0, dropped below) and
    # split: one autograd node for all chunks, where indexing row by row made the backward pass fill
    # a zero tensor of all the logits once per row (``bench/suite.py``, chapter 3's training case).
    tgt = torch.cat([input_ids[:, 1:], input_ids.new_zeros(B, 1)], 1).to(logits.device).reshape(-1, 1)
    step = max(1, chunk_elements // V)
    chunks = zip(logits.reshape(B * T, V).split(step), tgt.split(step))
    rows = [torch.logsumexp(f := z.float(), -1) - f.gather(1, y).squeeze(1) for z, y in chunks]
    nll = torch.cat(rows).view(B, T)[:, :-1] if rows else logits.new_zeros(B, max(T - 1, 0), dtype=torch.float32)
    return nll * target_mask.to(nll.device)


@dataclasses.dataclass
class Scored:
    """Texts encoded for scoring. ``batch.input_ids`` is ``[B, T]`` (start token first, right-padded);
    ``nbytes`` is ``[B]``, the UTF-8 length of each text."""

    texts: list[str]
    batch: Batch
    nbytes: torch.Tensor

    @property
    def target_mask(self) -> torch.Tensor:
        """``[B, T-1]``: 1 where position ``t+1`` holds a real token predicted from position ``t``."""
        return self.batch.attention_mask[:, 1:].float()

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, idx: Sequence[int]) -> "Scored":
        idx = list(idx)
        return Scored([self.texts[i] for i in idx], self.batch.select(idx), self.nbytes[idx])


def encode_texts(model_or_tokenizer, texts: Sequence[str]) -> Scored:
    """Encode ``texts`` for scoring (see the module docstring), right-padded."""
    tok = _tok(model_or_tokenizer)
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ParameterError(f"texts must be a non-empty list of non-empty strings, got {type(texts).__name__}")
    batch = pad_ids(tok, texts, [text_ids(tok, t, start=True) for t in texts])
    nbytes = torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.long)
    return Scored(list(texts), batch, nbytes)


def as_batch(texts: Scored | Batch) -> Batch:
    """The :class:`lmbook.core.tokens.Batch` behind a :class:`Scored` (a ``Batch`` is returned as is)."""
    return texts.batch if isinstance(texts, Scored) else texts


def length_batches(texts: Scored | Batch, batch_size: int) -> Iterator[list[int]]:
    """Row indices in groups of at most ``batch_size`` rows of similar length (less padding)."""
    check_int("batch_size", batch_size, 1)
    last = as_batch(texts).last
    order = sorted(range(len(last)), key=lambda i: int(last[i]))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def token_nll(model, scored: Scored, batch_size: int = 4, states_after: int | None = None):
    """Loss of every scored token, ``[B, T-1]`` nats (0 at padding), one nnsight trace per batch.

    With ``states_after=l`` the same traces also read the residual stream after block ``l`` at every
    position and the call returns ``(nll, states [B, T, d])``: the cache that
    :func:`lmbook.mechanisms.training.prefix_states` computes for ``n_frozen = l + 1``, without a
    second forward pass."""
    T = scored.batch.input_ids.shape[1]
    out = torch.zeros(len(scored), T - 1)
    states = None
    if states_after is not None:
        check_int("states_after", states_after, 0, model.num_layers - 1)
        states = torch.zeros(len(scored), T, model.hidden_size)
    for idx in length_batches(scored, batch_size):
        sub = scored.batch.select(idx)
        w = sub.input_ids.shape[1]
        with torch.no_grad(), trace(model, sub):
            if states_after is not None:
                h = model.layers_output[states_after].save()
            nll = logits_nll(model.logits, sub.input_ids, sub.attention_mask[:, 1:]).save()
        out[idx, : w - 1] = nll.float().cpu()
        if states is not None:
            states[idx, :w] = h.float().cpu()
    return out if states is None else (out, states)
