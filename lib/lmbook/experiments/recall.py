"""Subject enrichment and attribute extraction (Geva et al. 2023), measured by projecting
hidden states and sublayer updates to the vocabulary. Introduced in chapter 2.

* **Attributes rate**: of the top-``k`` tokens read from a hidden state (logit lens), after dropping
  stop words and tokens of two characters or fewer, the fraction that are related to the subject
  (:func:`lmbook.data.facts.related_token_sets`).
* **Extraction**: at the last position, whether the update an attention or MLP sublayer adds to the
  residual stream, projected by the unembedding, has the predicted attribute as its top token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmbook.data.facts import STOPWORDS
from lmbook.mechanisms.knockout import FactGroup, key_masks, last_token_run
from lmbook.core.models import model_device, trace
from lmbook.mechanisms.sublayers import sublayer_updates
from lmbook.core.params import ParameterError, check_int, check_layer
from lmbook.core.tokens import Batch

__all__ = ["POSITIONS", "position_index", "lens_topk", "sublayer_knockout_topk", "attributes_rate",
           "TokenText", "extraction_events"]

POSITIONS = ("subject first", "subject last", "after subject", "last")


def position_index(batch: Batch, spans: torch.Tensor) -> torch.Tensor:
    """Token index of each named position (:data:`POSITIONS`) for each row: ``[B, 4]``.
    ``after subject`` is the first token after the subject (``-1`` when that is the last token)."""
    s, e = spans[:, 0], spans[:, 1]
    after = torch.where(e < batch.last, e, torch.full_like(e, -1))
    return torch.stack([s, e - 1, after, batch.last], dim=1)


def lens_topk(model, batch: Batch, positions: torch.Tensor, k: int = 50, layers=None) -> torch.Tensor:
    """Top-``k`` token ids of the logit lens at ``positions`` (``[B, P]``, ``-1`` = skip) after each
    layer: ``[L, B, P, k]`` (rows for skipped positions hold the reading at position 0)."""
    check_int("k", k, 1, 5000)
    layers = list(range(model.num_layers)) if layers is None else [check_layer("layer", l, model.num_layers) for l in layers]
    B, P = positions.shape
    rows = torch.arange(B)[:, None].expand(B, P)
    pos = positions.clamp(min=0)
    with torch.no_grad(), trace(model, batch, last_only=True):
        out = list().save()
        for layer in layers:
            h = model.layers_output[layer][rows, pos]
            out.append(model.project_on_vocab(h).topk(k, dim=-1).indices)
    return torch.stack(out).cpu()


def sublayer_knockout_topk(model, batch: Batch, spans: torch.Tensor, read_layer: int, window: int,
                           k: int = 50, kinds: Sequence[str] = ("mlp", "attention")) -> tuple[torch.Tensor, list[int]]:
    """Geva et al.'s test of where subject enrichment happens: cancel the updates of the MLP (or
    attention) sublayers, at every position, in a window of ``window`` layers starting at each layer
    before ``read_layer``, and read the top-``k`` tokens of the subject's last position after
    ``read_layer``.

    Every (kind, start) of every prompt is one row of a single batched forward. Returns
    ``(ids [B, 1 + len(kinds) * S, k], starts)``: column 0 is the clean run, then each kind over the
    ``S`` start layers.
    """
    read_layer = check_layer("ENRICH_LAYER", read_layer, model.num_layers)
    check_int("ENRICH_WINDOW", window, 1, model.num_layers)
    bad = [x for x in kinds if x not in ("mlp", "attention")]
    if bad:
        raise ParameterError(f"unknown sublayer kinds {bad}; valid: ['mlp', 'attention']")
    starts = list(range(0, read_layer))
    R = 1 + len(kinds) * len(starts)
    B = len(batch)
    rep = batch.select([b for b in range(B) for _ in range(R)])
    # off[layer] -> (rows whose MLP is cancelled, rows whose attention is cancelled)
    cancel = {x: torch.zeros(model.num_layers, B * R, dtype=torch.bool) for x in ("mlp", "attention")}
    for b in range(B):
        r = 1
        for kind in kinds:
            for s in starts:
                cancel[kind][s:min(s + window, read_layer + 1), b * R + r] = True
                r += 1
    subj_last = (spans[:, 1] - 1).repeat_interleave(R)
    dev = model_device(model)
    cancel = {x: c.to(dev) for x, c in cancel.items()}
    with torch.no_grad(), trace(model, rep, last_only=True):
        for layer in range(read_layer + 1):
            if bool(cancel["attention"][layer].any()):
                a = model.attentions_output[layer]
                a[cancel["attention"][layer]] = 0.0
            if bool(cancel["mlp"][layer].any()):
                m = model.mlps_output[layer]
                m[cancel["mlp"][layer]] = 0.0
        h = model.layers_output[read_layer][torch.arange(B * R), subj_last]
        ids = model.project_on_vocab(h).topk(k, dim=-1).indices.save()
    return ids.cpu().reshape(B, R, k), starts


class TokenText:
    """Decoded, stripped, lower-cased text of token ids, cached (decoding is the slow part)."""

    def __init__(self, model):
        self.tok = getattr(model, "tokenizer", model)
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i]).strip().lower()
        return self.cache[i]


def attributes_rate(ids: torch.Tensor, related: frozenset[str], text: TokenText) -> float:
    """Attributes rate of one top-``k`` list ``ids`` ``[k]``: the share of its content tokens
    (not stop words, longer than two characters) whose text is in ``related``; 0 when the list
    holds no content token."""
    words = [text(int(i)) for i in ids]
    content = [w for w in words if len(w) > 2 and w not in STOPWORDS]
    if not content:
        return 0.0
    return sum(w in related for w in content) / len(content)


def extraction_events(model, group: FactGroup, predicted: torch.Tensor, block_subject: bool = True) -> torch.Tensor:
    """Whether each layer's attention and MLP update at the last position, projected by the
    unembedding (no final norm, as Geva et al. project with the embedding matrix), has the
    predicted token as its top-1: ``[F, V, L, 2]`` booleans, ``V`` = 1 (clean) or 2 (clean, and with
    the last position's attention to the subject blocked at every layer), last axis = (attention, MLP).
    """
    F, n = len(group.index), group.length
    R = 2 if block_subject else 1
    keep = torch.ones(F, R, n)
    if block_subject:
        for f in range(F):
            keep[f, 1, key_masks(n, tuple(group.spans[f].tolist()), False)["subject"]] = 0.0
    active = torch.zeros(model.num_layers, F * R, dtype=torch.bool)
    active[:, 1::R] = block_subject

    def read(model, layer):
        attn, mlp = sublayer_updates(model, layer)
        return torch.stack([model.lm_head(attn[:, -1]).argmax(-1), model.lm_head(mlp[:, -1]).argmax(-1)], -1)

    _, tops = last_token_run(model, group, keep.reshape(F * R, n), active, R, read_layer=read)
    tops = torch.stack(tops, 1).reshape(F, R, model.num_layers, 2)  # [F, R, L, 2]
    return tops == predicted.view(F, 1, 1, 1)


def extraction_facts(model, prompts: Sequence[str], subjects: Sequence[str], predicted: torch.Tensor,
                     max_group: int = 16, progress: bool = True) -> torch.Tensor:
    """:func:`extraction_events` over many prompts, grouped by length: ``[N, 2, L, 2]`` booleans
    (clean / subject blocked; attention / MLP)."""
    from tqdm.auto import tqdm

    from lmbook.mechanisms.knockout import group_facts

    groups = group_facts(model, prompts, subjects, predicted, max_group)
    out = torch.zeros(len(prompts), 2, model.num_layers, 2, dtype=torch.bool)
    for g in tqdm(groups, desc="attribute extraction", disable=not progress):
        out[g.index] = extraction_events(model, g, g.target)
    return out
