"""Causal tracing (Meng et al. 2022): corrupt the subject, restore one piece of the clean run,
and measure how much of the answer's probability comes back. Introduced in chapter 2.

For one prompt: the subject's token embeddings get Gaussian noise of standard deviation
``noise`` (3 times the standard deviation of subject-token embeddings in the chapter); from that
corrupted run, one clean state is restored at a time: the residual stream after layer ``l`` at
position ``p``, or the MLP (attention) outputs at position ``p`` in a window of layers around
``l``. The *indirect effect* of a state is ``p(answer | corrupted, restored) - p(answer | corrupted)``.
Every restoration for every noise sample is one row of a single batched forward.
"""

from __future__ import annotations

import dataclasses

import torch

from lmbook.mechanisms.knockout import layer_windows
from lmbook.core.models import trace
from lmbook.mechanisms.readout import final_logits
from lmbook.core.params import ParameterError, check_float, check_int
from lmbook.core.tokens import Batch

__all__ = ["TraceResult", "subject_embedding_std", "causal_trace", "KINDS"]

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
    wins = layer_windows(n_layers, window)

    # Clean run: every state that may be restored.
    with torch.no_grad(), trace(model, prompt, last_only=True):
        c_attn, c_mlp, c_hidden = list().save(), list().save(), list().save()
        for layer in range(n_layers):
            c_attn.append(model.attentions_output[layer][0])
            c_mlp.append(model.mlps_output[layer][0])
            c_hidden.append(model.layers_output[layer][0])
        p_clean = final_logits(model, prompt, last_only=True).float().softmax(-1)[0, target].save()
    clean = {"attention": torch.stack(c_attn), "mlp": torch.stack(c_mlp), "hidden": torch.stack(c_hidden)}  # [L, n, d], on the model's device

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
