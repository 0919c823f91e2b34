"""Perplexity and what it hides: per-token losses, bits per byte, token classes, and cheap further
pretraining of a model's top layers.

Introduced in chapter 3 ("Perplexity pitfalls"), after Öncel et al. (2024).

Scoring. Each text is scored on its own: a start token (the tokenizer's own BOS where it adds one,
else ``<|endoftext|>``, else BOS/EOS) is put in front, and every token of the text is predicted
from what precedes it, so the scored tokens cover the text's bytes exactly once. Then

* perplexity per token = ``exp(total nats / number of tokens)`` (depends on the tokenizer);
* bits per byte = ``total nats / ln 2 / number of UTF-8 bytes`` (comparable across tokenizers).

Per-token losses come from one nnsight trace per batch (:func:`token_nll`).

Training. :func:`adapt` continues pretraining with plain PyTorch (AdamW, constant learning rate,
gradient clipping) on the **top** ``k`` layers and the final norm only. The lower layers are frozen,
so their output on a fixed text never changes: :func:`prefix_states` computes it once (an nnsight
trace), and :func:`skip_lower_layers` swaps the lower layers for a stub that returns those cached
states, so every training step and every evaluation runs only the top layers and the unembedding.
``tests/test_perplexity.py`` checks that this gives the same losses as the full model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import unicodedata
from typing import Sequence

import numpy as np
import torch

from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_int
from lmbook.core.tokens import Batch, pad_ids, start_token_id
from lmbook.core.tokens import _tokenizer as _tok
from lmbook.mechanisms.likelihood import logits_nll

__all__ = ["Scored", "encode_texts", "token_nll", "summarize", "token_texts", "token_class",
           "CLASSES", "token_table", "class_shares", "top_token_shares", "ppl_excluding", "layer_modules",
           "skip_lower_layers", "prefix_states", "cached_nll", "cached_last_top1", "top_layer_parameters", "restore_after",
           "AdaptResult", "adapt"]

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# Scoring texts


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
        raise ParameterError("texts must be a non-empty list of non-empty strings")
    start = start_token_id(tok)
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=start is None)["input_ids"]
        rows.append(([start] if start is not None else []) + list(ids))
    batch = pad_ids(tok, texts, rows)
    nbytes = torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.long)
    return Scored(list(texts), batch, nbytes)


def _batches(texts, batch_size: int):
    """Index groups of similar length (less padding); ``texts`` is a :class:`Scored` or a ``Batch``."""
    check_int("batch_size", batch_size, 1)
    last = _as_batch(texts).last
    order = sorted(range(len(last)), key=lambda i: int(last[i]))
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def token_nll(model, scored: Scored, batch_size: int = 4, states_after: int | None = None):
    """Loss of every scored token, ``[B, T-1]`` nats (0 at padding), one nnsight trace per batch.

    With ``states_after=l`` the same traces also read the residual stream after block ``l`` at every
    position and the call returns ``(nll, states [B, T, d])``: the cache :func:`prefix_states`
    would compute for ``n_frozen = l + 1``, without a second forward pass."""
    T = scored.batch.input_ids.shape[1]
    out = torch.zeros(len(scored), T - 1)
    states = None
    if states_after is not None:
        check_int("states_after", states_after, 0, model.num_layers - 1)
        states = torch.zeros(len(scored), T, model.hidden_size)
    for idx in _batches(scored, batch_size):
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


def summarize(nll: torch.Tensor, scored: Scored) -> dict:
    """Totals of a scored set: tokens, bytes, nats, perplexity per token, bits per byte and per token."""
    mask = scored.target_mask
    nats = float((nll * mask).sum())
    tokens = int(mask.sum())
    nbytes = int(scored.nbytes.sum())
    return {"tokens": tokens, "bytes": nbytes, "nats": nats, "ppl": math.exp(nats / tokens),
            "bits_per_byte": nats / LN2 / nbytes, "bits_per_token": nats / LN2 / tokens,
            "bytes_per_token": nbytes / tokens}


# --------------------------------------------------------------------------------------------------
# Which tokens carry the loss

CLASSES = ["newline", "space", "punctuation", "digits", "word", "other"]
"""Token classes: whitespace containing a line break; other whitespace (spaces, indentation);
punctuation and symbols (with or without surrounding spaces); digits; words and word pieces
(letters, digits, underscores, apostrophes; with or without a leading space); anything else
(mixed tokens such as ``'):'`` with letters, or a byte of a multi-byte character)."""


def token_class(text: str) -> str:
    """The class in :data:`CLASSES` of a token's text."""
    if not text or "\ufffd" in text:
        return "other"
    if text.isspace():
        return "newline" if ("\n" in text or "\r" in text) else "space"
    core = text.strip()
    if any(ch.isspace() for ch in core):
        return "other"
    if all(ch.isdigit() for ch in core):
        return "digits"
    if all(unicodedata.category(ch)[0] in "PS" for ch in core):
        return "punctuation"
    if any(ch.isalpha() for ch in core) and all(ch.isalnum() or ch in "_'’" for ch in core):
        return "word"
    return "other"


def token_texts(model_or_tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoded in context (``decode(ids[:i+1])`` minus ``decode(ids[:i])``),
    so that leading spaces survive tokenizers that drop them when a token is decoded alone."""
    tok = _tok(model_or_tokenizer)
    ids = [int(i) for i in ids]
    out, prev = [], ""
    for i in range(len(ids)):
        cur = tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
        out.append(cur[len(prev):] if cur.startswith(prev) else cur)
        prev = cur
    return out


def token_table(model_or_tokenizer, scored: Scored, nll: torch.Tensor, **columns):
    """One row per scored token: ``segment``, ``position``, ``token_id``, ``text``, ``cls``, ``nll``
    (nats), plus constant ``columns`` (e.g. ``domain=...``). A pandas DataFrame."""
    import pandas as pd

    tok = _tok(model_or_tokenizer)
    rows = []
    for b in range(len(scored)):
        n = int(scored.batch.last[b]) + 1
        ids = scored.batch.input_ids[b, 1:n].tolist()  # the start token (or BOS) is not part of the text
        for p, (tid, text) in enumerate(zip(ids, token_texts(tok, ids))):
            rows.append((b, p + 1, tid, text, token_class(text), float(nll[b, p])))
    df = pd.DataFrame(rows, columns=["segment", "position", "token_id", "text", "cls", "nll"])
    for k, v in columns.items():
        df[k] = v
    return df


def class_shares(table, by: Sequence[str] = ()) -> "object":
    """Per token class (and ``by`` columns): tokens, share of tokens, nats, share of the total loss,
    mean loss, and ``contribution`` = nats / all tokens, so contributions add up to the mean loss."""
    by = list(by)
    g = table.groupby(by + ["cls"], observed=True)["nll"].agg(tokens="size", nats="sum").reset_index()
    tot = g.groupby(by)[["tokens", "nats"]].transform("sum") if by else g[["tokens", "nats"]].sum()
    g["token share"] = g["tokens"] / tot["tokens"]
    g["loss share"] = g["nats"] / tot["nats"]
    g["mean nll"] = g["nats"] / g["tokens"]
    g["contribution"] = g["nats"] / tot["tokens"]
    return g


def top_token_shares(table, k: int = 10) -> dict:
    """Share of the total loss (and of the tokens) carried by the ``k`` token types (distinct token
    texts) with the largest total loss, and the cumulative loss share over all types by rank."""
    per_type = table.groupby("text")["nll"].agg(["sum", "size"]).sort_values("sum", ascending=False)
    total = per_type["sum"].sum()
    cum = np.cumsum(per_type["sum"].to_numpy()) / total
    top = per_type.head(k)
    return {"loss_share": float(top["sum"].sum() / total), "token_share": float(top["size"].sum() / len(table)),
            "types": int(len(per_type)), "cumulative": cum, "top": top}


def ppl_excluding(table, classes: Sequence[str]) -> float:
    """Perplexity per token over the tokens not in ``classes``."""
    keep = table[~table["cls"].isin(list(classes))]
    return math.exp(keep["nll"].mean()) if len(keep) else float("nan")


# --------------------------------------------------------------------------------------------------
# Training the top layers on cached lower-layer states


def layer_modules(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the module behind nnterp's ``model.layers``)."""
    layers = getattr(model.layers, "_module", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ParameterError("could not find the model's list of layers behind model.layers")
    return layers


def _final_norm(model) -> torch.nn.Module:
    return model.ln_final._module


class _CachedOutput(torch.nn.Module):
    """Stands in for the frozen lower blocks: returns the cached residual stream it is given."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.value is None:
            raise RuntimeError("skip_lower_layers: set the cached states before the forward pass")
        if self.value.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(f"cached states {tuple(self.value.shape)} do not match the input {tuple(hidden_states.shape)}")
        return self.value.to(device=hidden_states.device, dtype=hidden_states.dtype)


@contextlib.contextmanager
def skip_lower_layers(model, n_frozen: int):
    """Inside this context the model's blocks ``0 .. n_frozen-1`` are replaced by one stub whose
    output is ``stub.value`` (set it to the cached states of the batch before each forward). The
    blocks are put back on exit, also after an error. ``n_frozen=0`` changes nothing."""
    layers = layer_modules(model)
    check_int("n_frozen", n_frozen, 0, len(layers) - 1)
    originals = [layers[i] for i in range(n_frozen)]
    stub = _CachedOutput()
    try:
        for i in range(n_frozen):
            layers[i] = stub
        yield stub
    finally:
        for i, m in enumerate(originals):
            layers[i] = m


def _as_batch(x) -> Batch:
    return x.batch if isinstance(x, Scored) else x


def prefix_states(model, texts, n_frozen: int, batch_size: int = 8) -> torch.Tensor | None:
    """Residual stream after block ``n_frozen - 1`` at every position, ``[B, T, d]`` (nnsight), or
    ``None`` when ``n_frozen == 0`` (nothing is frozen, nothing to cache). ``texts`` is a
    :class:`Scored` or a :class:`lmbook.core.tokens.Batch`."""
    check_int("n_frozen", n_frozen, 0, model.num_layers - 1)
    if n_frozen == 0:
        return None
    batch = _as_batch(texts)
    T = batch.input_ids.shape[1]
    out = torch.zeros(len(batch), T, model.hidden_size)
    for idx in _batches(batch, batch_size):
        sub = batch.select(idx)
        with torch.no_grad(), trace(model, sub):
            h = model.layers_output[n_frozen - 1].save()
        out[idx, : sub.input_ids.shape[1]] = h.float().cpu()
    return out


def _forward_logits(model, stub, states, ids, mask):
    hf = model._model
    device = next(hf.parameters()).device
    if stub is not None:
        stub.value = states.to(device)
    return hf(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits


def cached_nll(model, scored: Scored, states: torch.Tensor | None, n_frozen: int, batch_size: int = 8) -> torch.Tensor:
    """Like :func:`token_nll`, but running only blocks ``n_frozen ..`` on cached ``states``
    (from :func:`prefix_states`); plain PyTorch, so it also works while the model is being trained."""
    T = scored.batch.input_ids.shape[1]
    out = torch.zeros(len(scored), T - 1)
    with torch.no_grad(), skip_lower_layers(model, n_frozen) as stub:
        for idx in _batches(scored, batch_size):
            sub = scored.batch.select(idx)
            w = sub.input_ids.shape[1]
            logits = _forward_logits(model, stub if n_frozen else None,
                                     None if states is None else states[idx, :w], sub.input_ids, sub.attention_mask)
            out[idx, : w - 1] = logits_nll(logits, sub.input_ids, sub.attention_mask[:, 1:]).float().cpu()
    return out


def cached_last_top1(model, batch: Batch, states: torch.Tensor | None, n_frozen: int, batch_size: int = 64) -> torch.Tensor:
    """Top-1 next token after each row's last token, ``[B]``, running only blocks ``n_frozen ..`` on
    cached ``states`` of ``batch`` (a :class:`lmbook.core.tokens.Batch`, as :func:`lmbook.data.facts.known_mask`
    encodes its prompts). Logits are computed at the last tokens only."""
    hf = model._model
    device = next(hf.parameters()).device
    out = torch.empty(len(batch), dtype=torch.long)
    with torch.no_grad(), skip_lower_layers(model, n_frozen) as stub:
        for idx in _batches(batch, batch_size):
            sub = batch.select(idx)
            keep = torch.unique(sub.last)
            if n_frozen:
                stub.value = states[idx, : sub.input_ids.shape[1]].to(device)
            logits = hf(input_ids=sub.input_ids.to(device), attention_mask=sub.attention_mask.to(device),
                        use_cache=False, logits_to_keep=keep.to(device)).logits
            col = torch.searchsorted(keep, sub.last)
            out[idx] = logits[torch.arange(len(idx)), col.to(logits.device)].argmax(-1).cpu()
    return out


def top_layer_parameters(model, n_train_layers: int) -> list[torch.nn.Parameter]:
    """Parameters of the top ``n_train_layers`` blocks and of the final norm (the ones :func:`adapt`
    trains). Embeddings and the unembedding stay frozen."""
    n = model.num_layers
    check_int("n_train_layers", n_train_layers, 1, n)
    layers = layer_modules(model)
    params = [p for i in range(n - n_train_layers, n) for p in layers[i].parameters()]
    params += list(_final_norm(model).parameters())
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@contextlib.contextmanager
def restore_after(params: Sequence[torch.nn.Parameter]):
    """Keep a CPU copy of ``params`` and write it back on exit, so every adaptation starts from the
    same base model. ``requires_grad`` is switched off again too."""
    saved = [p.detach().to("cpu", copy=True) for p in params]
    try:
        yield params
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s.to(p.device))
                p.requires_grad_(False)
                p.grad = None


@dataclasses.dataclass
class AdaptResult:
    """What :func:`adapt` measured. ``eval_steps``: steps at which the eval sets were scored;
    ``eval_nats[name]``: total nats of eval set ``name`` at each of those steps (divide by its
    tokens or bytes); ``final_nll[name]``: ``[B, T-1]`` per-token losses after the last step;
    ``train_loss``: mean loss of each training batch; ``steps_per_epoch``."""

    eval_steps: list[int]
    eval_nats: dict[str, list[float]]
    final_nll: dict[str, torch.Tensor]
    train_loss: list[float]
    steps_per_epoch: int


def adapt(model, train: Scored, train_states, evals: dict, *, n_train_layers: int, lr: float, epochs: int,
          batch_size: int = 4, eval_every: int | None = None, eval_steps: Sequence[int] | None = None,
          seed: int = 0, max_grad_norm: float = 1.0, initial_nats: dict | None = None,
          desc: str = "training") -> AdaptResult:
    """Continue pretraining the top ``n_train_layers`` blocks (and the final norm) on ``train``.

    ``train_states`` and the states in ``evals`` (``{name: (scored, states)}``) come from
    :func:`prefix_states` with ``n_frozen = model.num_layers - n_train_layers``. AdamW with a
    constant learning rate ``lr``, no weight decay, gradients clipped to ``max_grad_norm``; the
    batches of each epoch are a seeded permutation of the training segments. The eval sets are
    scored at step 0, every ``eval_every`` steps (or at ``eval_steps``) and after the last step.
    The weights are changed in place: wrap the call in :func:`restore_after`. ``epochs=0`` trains
    nothing and scores the eval sets once. ``initial_nats`` (``{name: total nats}`` of the base
    model, the same for every run) spares scoring the eval sets again at step 0.
    """
    from tqdm.auto import tqdm

    check_int("epochs", epochs, 0)
    n_frozen = model.num_layers - n_train_layers
    params = top_layer_parameters(model, n_train_layers)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / batch_size)
    total = per_epoch * epochs
    marks = set(eval_steps or []) | {0, total}
    if eval_every:
        marks |= set(range(0, total + 1, eval_every))
    marks = sorted(m for m in marks if 0 <= m <= total)
    res = AdaptResult(marks, {k: [] for k in evals}, {}, [], per_epoch)
    gen = torch.Generator().manual_seed(seed)

    def evaluate(step):
        for name, (sc, st) in evals.items():
            nll = cached_nll(model, sc, st, n_frozen)
            res.eval_nats[name].append(float((nll * sc.target_mask).sum()))
            if step == total:
                res.final_nll[name] = nll

    if initial_nats is not None and total > 0:
        for name in evals:
            res.eval_nats[name].append(float(initial_nats[name]))
    else:
        evaluate(0)
    step = 0
    bar = tqdm(total=total, desc=desc, leave=False)
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(train), generator=gen).tolist()
            for s in range(0, len(perm), batch_size):
                idx = perm[s:s + batch_size]
                sub = train.batch.select(idx)
                w = sub.input_ids.shape[1]
                with skip_lower_layers(model, n_frozen) as stub:
                    logits = _forward_logits(model, stub if n_frozen else None,
                                             None if train_states is None else train_states[idx, :w],
                                             sub.input_ids, sub.attention_mask)
                nll = logits_nll(logits, sub.input_ids, sub.attention_mask[:, 1:])
                loss = nll.sum() / sub.attention_mask[:, 1:].sum().to(nll.device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                res.train_loss.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{res.train_loss[-1]:.3f}")
                if step in marks:
                    evaluate(step)
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
    return res
