"""Causal tracing (Meng et al. 2022): corrupt the subject, restore one piece of the clean run,
and measure how much of the answer's probability comes back. Introduced in chapter 2.

For one prompt: the subject's token embeddings get Gaussian noise of standard deviation
``noise`` (3 times the standard deviation of subject-token embeddings in the chapter); from that
corrupted run, one clean state is restored at a time: the residual stream after layer ``l`` at
position ``p``, or the MLP (attention) outputs at position ``p`` in a window of layers around
``l``. The *indirect effect* of a state is ``p(answer | corrupted, restored) - p(answer | corrupted)``.
Every restoration for every noise sample is one row of a single batched forward.

:func:`run_causal_tracing` runs the chapter's protocol over many facts (restoring the four
positions :data:`lmbook.mechanisms.knockout.POSITIONS`) and returns a :class:`CausalTracingRun`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from lmbook.core.claims import Estimate, bootstrap_stat
from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_float, check_int
from lmbook.core.tokens import Batch, encode, token_span
from lmbook.data.facts import Fact, answer_token_ids
from lmbook.mechanisms.knockout import POSITIONS, layer_windows, position_index
from lmbook.mechanisms.readout import final_logits

__all__ = ["TraceResult", "subject_embedding_std", "causal_trace", "KINDS", "CausalTracingRun", "run_causal_tracing",
           "EMPTY_SUMMARY"]

KINDS = ("hidden", "mlp", "attention")


@dataclasses.dataclass
class TraceResult:
    """``effects[kind]``: ``[L, P]`` mean indirect effect over noise samples, at each layer and
    each traced position ``positions`` (``[P]`` token indices); ``p_clean``/``p_corrupt``: the
    answer's probability in the clean run and (mean over samples) in the corrupted run."""

    positions: list[int]
    effects: dict[str, torch.Tensor]
    p_clean: float
    p_corrupt: float


def subject_embedding_std(model, batch: Batch, spans: torch.Tensor) -> float:
    """Standard deviation of the input embeddings (as the first layer receives them) over every
    subject token of the batch, all dimensions pooled."""
    with torch.no_grad(), trace(model, batch, last_only=True):
        emb = model.embed_tokens.output.save()
    emb = emb.cpu()
    vals = torch.cat([emb[i, int(s):int(e)].flatten() for i, (s, e) in enumerate(spans.tolist())])
    return float(vals.float().std())


def causal_trace(model, prompt: Batch, span: tuple[int, int], target: int, noise: float,
                 samples: int = 3, window: int = 5, positions: list[int] | None = None,
                 kinds=KINDS, seed: int = 0) -> TraceResult:
    """Causal tracing of one prompt (``prompt`` holds one row); see the module docstring.

    ``positions``: token positions to restore (default: every position from the subject's first
    token on; earlier positions are identical in the clean and corrupted runs, so restoring them
    has no effect by construction). ``noise=0`` makes the corrupted run the clean one.
    """
    if len(prompt) != 1:
        raise ParameterError("causal_trace takes one prompt")
    check_float("noise", noise, 0.0)
    check_int("NOISE_SAMPLES", samples, 1, 100)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ParameterError(f"unknown causal-tracing kinds {bad}; valid: {list(KINDS)}")
    n_layers = model.num_layers
    n = int(prompt.last[0]) + 1
    s, e = span
    if positions is None:
        positions = list(range(s, n))
    if not positions or any(not 0 <= p < n for p in positions):
        raise ParameterError(f"positions must lie in 0..{n - 1}, got {positions}")
    wins = layer_windows(n_layers, window, "window")

    # Clean run: every state that may be restored.
    with torch.no_grad(), trace(model, prompt, last_only=True):
        c_attn, c_mlp, c_hidden = list().save(), list().save(), list().save()
        for layer in range(n_layers):
            c_attn.append(model.attentions_output[layer][0])
            c_mlp.append(model.mlps_output[layer][0])
            c_hidden.append(model.layers_output[layer][0])
        p_clean = final_logits(model, prompt, last_only=True).float().softmax(-1)[0, target].save()
    # [L, n, d] each, on the model's device
    clean = {"attention": torch.stack(c_attn), "mlp": torch.stack(c_mlp), "hidden": torch.stack(c_hidden)}

    # Rows: per sample, one corrupted baseline, then (kind, layer, position) restorations.
    plan = [(k, l, p) for k in kinds for l in range(n_layers) for p in positions]
    per_sample = 1 + len(plan)
    R = samples * per_sample
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(samples, e - s, model.hidden_size, generator=g) * noise
    eps = eps.repeat_interleave(per_sample, 0)  # [R, subj, d]
    # restore[kind][layer] -> (row indices, positions) restored at that layer
    restore = {k: {l: ([], []) for l in range(n_layers)} for k in KINDS}
    for i in range(samples):
        for j, (k, l, p) in enumerate(plan):
            row = i * per_sample + 1 + j
            for layer in ([l] if k == "hidden" else wins[l]):
                restore[k][layer][0].append(row)
                restore[k][layer][1].append(p)
    rep = prompt.select([0] * R)
    with torch.no_grad(), trace(model, rep, last_only=True):
        emb = model.embed_tokens.output
        emb[:, s:e] = emb[:, s:e] + eps.to(emb.device, emb.dtype)
        for layer in range(n_layers):
            for kind, module in (("attention", model.attentions_output), ("mlp", model.mlps_output),
                                 ("hidden", model.layers_output)):
                rows, pos = restore[kind][layer]
                if rows:
                    h = module[layer]
                    h[torch.tensor(rows), torch.tensor(pos)] = clean[kind][layer][torch.tensor(pos)].to(h.dtype)
        probs = final_logits(model, rep, last_only=True).float().softmax(-1)[:, target].save()
    probs = probs.cpu().reshape(samples, per_sample)
    base = probs[:, :1]
    effect = (probs[:, 1:] - base).mean(0)  # [len(plan)]
    effects = {}
    j = 0
    for k in kinds:
        block = effect[j:j + n_layers * len(positions)].reshape(n_layers, len(positions))
        effects[k] = block
        j += n_layers * len(positions)
    return TraceResult(list(positions), effects, float(p_clean), float(base.mean()))


def _peak_of_mean(e: np.ndarray) -> float:
    """Layer of the largest mean over facts of ``e`` ``[F, L]`` (NaNs skipped); NaN when all are NaN."""
    mean = np.nanmean(e, 0)
    return math.nan if np.isnan(mean).all() else float(np.nanargmax(mean))


@dataclasses.dataclass
class CausalTracingRun:
    """Causal tracing of ``F`` facts (:func:`run_causal_tracing`).

    * ``effects[kind]``: ``[F, L, 4]`` indirect effect by layer at the positions
      :data:`lmbook.mechanisms.knockout.POSITIONS` (NaN where a fact has no such position)
    * ``p_clean`` / ``p_corrupt``: ``[F]`` the answer's probability, clean and corrupted
    * ``noise``: the noise standard deviation used
    """

    effects: dict[str, np.ndarray]
    p_clean: np.ndarray
    p_corrupt: np.ndarray
    noise: float

    def average_effect(self, kind: str) -> np.ndarray:
        """Average indirect effect over facts, ``[L, 4]``."""
        return np.nanmean(self.effects[kind], axis=0)

    def peak_layer(self, kind: str, position: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """The layer where the average indirect effect of restoring ``kind`` at ``position`` (one of
        :data:`~lmbook.mechanisms.knockout.POSITIONS`) peaks, with a 95% bootstrap interval over facts; NaN
        with fewer than two facts or when no fact has that position."""
        c = POSITIONS.index(position)
        return bootstrap_stat(self.effects[kind][:, :, c], _peak_of_mean, n_boot, seed)

    def corruption_drop(self, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """Mean of ``p_clean - p_corrupt`` over facts (how much corrupting the subject lowers the answer's
        probability), with a 95% bootstrap interval over facts; NaN with fewer than two facts."""
        return bootstrap_stat(self.p_clean - self.p_corrupt, np.mean, n_boot, seed)

    def summary(self) -> dict:
        """Mean clean and corrupted probabilities, and for each kind the peak of the average
        indirect effect (value, layer, position) overall and at the subject's last token."""
        out = {"p_clean": float(self.p_clean.mean()), "p_corrupt": float(self.p_corrupt.mean())}
        for kind in KINDS:
            aie = self.average_effect(kind)  # [L, positions]
            layer, c = np.unravel_index(np.nanargmax(aie), aie.shape)
            out[f"{kind}_peak"] = float(aie[layer, c])
            out[f"{kind}_peak_layer"] = int(layer)
            out[f"{kind}_peak_position"] = POSITIONS[c]
            out[f"{kind}_subject_last_peak"] = float(np.nanmax(aie[:, 1]))
            out[f"{kind}_subject_last_peak_layer"] = int(np.nanargmax(aie[:, 1]))
        return out


# What the chapter records when nothing was traced (N_TRACE = 0), so that its text still renders.
EMPTY_SUMMARY = {"p_clean": float("nan"), "p_corrupt": float("nan"), "mlp_subject_last_peak": float("nan"),
                 "mlp_subject_last_peak_layer": -1, "attention_peak": float("nan"), "attention_peak_layer": -1,
                 "hidden_subject_last_peak": float("nan"), "attention_peak_position": "none"}


def run_causal_tracing(model, facts: Sequence[Fact], noise_factor: float = 3.0, samples: int = 2,
                       window: int = 5, seed: int = 0, progress: bool = True) -> CausalTracingRun:
    """ROME's causal tracing of each fact (chapter 2): noise of ``noise_factor`` times the standard
    deviation of the facts' subject-token embeddings, ``samples`` noise draws per fact (seeded
    ``seed + i`` for fact ``i``), restoring the four positions of
    :data:`~lmbook.mechanisms.knockout.POSITIONS` that each prompt has. One batched forward per fact."""
    from tqdm.auto import tqdm

    if not facts:
        raise ParameterError("run_causal_tracing needs at least one fact")
    check_float("NOISE_FACTOR", noise_factor, 0.0)
    check_int("TRACE_WINDOW", window, 1, model.num_layers)
    b = encode(model, [f.prompt for f in facts])
    spans = torch.tensor([token_span(b, i, f.subject) for i, f in enumerate(facts)])
    noise = noise_factor * subject_embedding_std(model, b, spans)
    pos = position_index(b, spans)
    target = answer_token_ids(model, facts)
    eff = {k: np.full((len(facts), model.num_layers, len(POSITIONS)), np.nan) for k in KINDS}
    pc, pk = [], []
    for i in tqdm(range(len(facts)), desc="causal tracing", disable=not progress):
        cats = [(c, int(pos[i, c])) for c in range(len(POSITIONS)) if pos[i, c] >= 0]
        r = causal_trace(model, b.select([i]), tuple(spans[i].tolist()), int(target[i]), noise, samples=samples,
                         window=window, positions=[p for _, p in cats], seed=seed + i)
        for kind in KINDS:
            for j, (c, _) in enumerate(cats):
                eff[kind][i, :, c] = r.effects[kind][:, j].detach().numpy()
        pc.append(r.p_clean)
        pk.append(r.p_corrupt)
    return CausalTracingRun(eff, np.array(pc), np.array(pk), noise)
