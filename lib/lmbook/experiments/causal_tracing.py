"""Causal tracing (Meng et al. 2022, "ROME"): corrupt the subject, restore one piece of the clean run,
and measure how much of the answer's probability comes back. Introduced in chapter 2.

**The protocol**, as ROME's reference code runs it. For one prompt (encoded with the start token,
:func:`lmbook.core.tokens.encode` with ``start=True``), Gaussian noise of standard deviation ``noise``
(ROME: 3 times the standard deviation of subject-token embeddings) is added to the input embeddings of
the subject's tokens, and only there: position 0, the start token and attention sink, is never noised.
Each of ``samples`` noise draws is shared by every restoration of that prompt (paired, as in the
reference). From each corrupted run one clean state is restored at a time: the residual stream after
layer ``l`` at position ``p`` (``hidden``), or the MLP (``mlp``) or attention (``attention``) outputs at
position ``p`` in every layer of a window of ``window`` layers centred on ``l`` (ROME: 10). The
*indirect effect* of a state is ``p(answer | corrupted, restored) - p(answer | corrupted)``, averaged
over the noise draws; this module reports it unnormalised (ROME's average indirect effect), in
probability units.

**Rows of the heatmaps.** Every position from the subject's first token to the prompt's last is
restored (earlier positions are identical in the clean and corrupted runs, so their effect is zero by
construction). Averages over facts use ROME's six categories of positions (:data:`CATEGORIES`,
:func:`rome_categories`): first, middle and last subject token, first subsequent token, further tokens,
last token; a category a prompt does not have (a middle token of a two-token subject) is missing (NaN)
for that fact, and a category of several tokens is their mean.

**Cost.** Per prompt, one forward runs the clean prompt and every corrupted copy, keeping the clean
states and the corrupted keys and values. A restoration at position ``p`` changes nothing before
``p``, so all restorations at ``p`` run as one batch of only the tokens ``p..last`` on top of their
corrupted run's cached keys and values of positions ``< p`` (positions before the subject are the
clean ones: the cache holds them once). Only the last position's final state is read, and the
answer's probability needs one log-sum-exp over the vocabulary per row there. A restoration that
cannot reach the last position (the last layer's outputs at an earlier position) is not run: its
effect is exactly zero. A restoration also changes nothing below the first layer it touches, so the
rows at a position may be split by that layer into a few groups whose forwards start higher up, from
the corrupted run's residual stream (``bands``). Prompts never share a forward, so there is no
padding. :func:`causal_trace_looped` computes the same numbers the plain way, one full forward per
restoration; the tests check that both agree, and the causal-tracing case of ``bench/suite.py`` times
the library against a plain nnsight loop.

The forwards here use plain PyTorch hooks on the model's modules (the ones nnterp names
``embed_tokens``, ``layers``, ``mlps``, ``attentions``), not nnsight traces: a cached continuation of
hundreds of rows is the whole cost of the chapter's tracing, and a hook adds nothing to it. A model
traced remotely (NDIF, ``lmbook.core.models``) keeps no cache between requests: there every restoration
is a row of one traced forward of the whole prompt (the same numbers; ``tests/test_remote.py``).

:func:`run_causal_tracing` runs the protocol over many facts and returns a :class:`CausalTracingRun`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from lmbook.core.claims import Estimate, bootstrap_stat
from lmbook.core.models import trace
from lmbook.core.params import ParameterError, check_float, check_int
from lmbook.core.stats import bootstrap_ci
from lmbook.core.tokens import Batch, decode_tokens, encode, token_span
from lmbook.data.facts import Fact, answer_token_ids
from lmbook.mechanisms.knockout import layer_windows
from lmbook.mechanisms.readout import final_logits, softcap

__all__ = ["KINDS", "CATEGORIES", "ALIASES", "rome_categories", "TraceResult", "subject_embedding_std",
           "causal_trace", "causal_trace_looped", "target_probs", "CausalTracingRun", "run_causal_tracing",
           "trace_layers", "spread_layers", "restoration_window", "ROME", "EMPTY_SUMMARY"]

KINDS = ("hidden", "mlp", "attention")

CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")
"""ROME's rows of the averaged heatmaps, in its order."""

ROME = {"facts": 1000, "samples": 10, "noise_factor": 3.0, "window": 10, "n_layers": 48, "layer_stride": 1}
"""ROME's causal-tracing protocol on GPT-2 XL (Meng et al. 2022): about 1000 facts, 10 noise draws each, noise
3 times the standard deviation of subject-token embeddings, MLP/attention windows of 10 of the 48 layers,
every layer restored."""

ALIASES = {"subject first": "first subject token", "subject last": "last subject token",
           "after subject": "first subsequent token", "last": "last token"}
"""The names chapter 2's other experiments give these positions (:data:`lmbook.mechanisms.knockout.POSITIONS`)."""


def _category(name: str) -> int:
    key = ALIASES.get(name, name)
    if key not in CATEGORIES:
        raise ParameterError(f"unknown position category {name!r}; valid: {list(CATEGORIES)} "
                             f"(or {list(ALIASES)})")
    return CATEGORIES.index(key)


def rome_categories(span: tuple[int, int], last: int) -> dict[str, list[int]]:
    """The token positions of each of ROME's categories (:data:`CATEGORIES`) for a prompt whose subject
    spans ``[start, end)`` and whose last token is at ``last``: first subject token ``start``, middle
    subject tokens ``start+1..end-2``, last subject token ``end-1`` (a one-token subject is both first
    and last), first subsequent token ``end`` and further tokens ``end+1..last-1`` (both only before the
    last token), last token ``last``. An empty list: the prompt has no such position."""
    s, e = int(span[0]), int(span[1])
    if not 0 <= s < e <= last:
        raise ParameterError(f"subject span [{s}, {e}) must lie before the last token {last}")
    return {"first subject token": [s], "middle subject tokens": list(range(s + 1, e - 1)),
            "last subject token": [e - 1], "first subsequent token": [e] if e < last else [],
            "further tokens": list(range(e + 1, last)), "last token": [last]}


@dataclasses.dataclass
class TraceResult:
    """``effects[kind]``: ``[L', P]`` indirect effect (mean over noise samples) for each restored layer
    ``layers`` (window centres for ``mlp``/``attention``) and each restored position ``positions``;
    ``p_clean``/``p_corrupt``: the answer's probability in the clean run and (mean over samples) in the
    corrupted one; ``p_corrupt_samples``: ``[samples]``."""

    positions: list[int]
    effects: dict[str, torch.Tensor]
    p_clean: float
    p_corrupt: float
    layers: list[int] = dataclasses.field(default_factory=list)
    p_corrupt_samples: torch.Tensor | None = None


# ---------------------------------------------------------------- the model's modules, with plain hooks


def _modules(model) -> dict:
    L = model.num_layers
    return {"embed": model.embed_tokens._module, "hidden": [model.layers[i]._module for i in range(L)],
            "mlp": [model.mlps[i]._module for i in range(L)],
            "attention": [model.attentions[i]._module for i in range(L)],
            "base": model._model.base_model, "head": model.lm_head._module}


def _main(out):
    return out[0] if isinstance(out, tuple) else out


class _Hooks:
    """Forward hooks that add noise to the embeddings and restore clean states, driven by ``self.plan``
    (set before each forward), or that record states (``self.record``)."""

    def __init__(self, model):
        self.mods = _modules(model)
        self.noise = None  # (rows [R'], local positions [T'], eps [R', T', d]) added to the embeddings
        self.restore = {}  # (kind, layer) -> (rows [r], local position, values [r, d])
        self.record = None  # dict kind -> list of [R, T, d] per layer, filled when set
        self.handles = []

    def __enter__(self):
        def emb_hook(_m, _a, out):
            if self.noise is not None:
                rows, pos, eps = self.noise
                out[rows[:, None], pos[None, :]] += eps.to(out.dtype)
            if self.record is not None:
                self.record["embed"] = out.detach().clone()
            return out

        def state_hook(kind, layer):
            def hook(_m, _a, out):
                h = _main(out)
                r = self.restore.get((kind, layer))
                if r is not None:
                    rows, pos, vals = r
                    h[rows, pos] = vals.to(h.dtype)
                if self.record is not None:
                    self.record[kind].append((h if kind == "hidden" else h[:1]).detach().clone())
                return out
            return hook

        self.handles.append(self.mods["embed"].register_forward_hook(emb_hook))
        for kind in KINDS:
            for layer, mod in enumerate(self.mods[kind]):
                self.handles.append(mod.register_forward_hook(state_hook(kind, layer)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def target_probs(model, h: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Probability of ``targets`` ``[R]`` from final-norm outputs ``h`` ``[R, d]`` (one row each, the last
    position only): the target's logit minus the log-sum-exp over the vocabulary (soft-capped where the
    model does), ``chunk`` rows at a time, in float32. Returns ``[R]``."""
    head = model.lm_head._module
    out = []
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            z = softcap(model, head(h[i:i + chunk].to(head.weight.device, head.weight.dtype)).float())
            t = targets[i:i + chunk].to(z.device)
            out.append((z.gather(-1, t[:, None])[:, 0] - z.logsumexp(-1)).exp().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _final_states(model, mods, input_ids, position_ids, cache=None) -> torch.Tensor:
    """The final norm's output at the last position ``[R, d]`` of a forward of ``input_ids`` ``[R, T]``
    (optionally continuing ``cache``); no logits are computed."""
    R, T = input_ids.shape
    past = 0 if cache is None else cache.get_seq_length()
    dev = next(mods["base"].parameters()).device
    out = mods["base"](input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                       attention_mask=torch.ones(R, past + T, dtype=torch.long, device=dev),
                       cache=cache, use_cache=cache is not None)
    return out.last_hidden_state[:, -1]


def _can_start_mid(model) -> bool:
    """Whether a forward can start at any layer from a residual stream given as ``inputs_embeds``: the base
    model holds its blocks as ``layers`` and adds no learned position embedding to its input (GPT-2's
    ``wpe`` would be added again)."""
    base = model._model.base_model
    return isinstance(getattr(base, "layers", None), torch.nn.ModuleList) and not hasattr(base, "wpe")


@contextlib.contextmanager
def _from_layer(model, b: int):
    """For the duration of the block the base model runs only its blocks ``b..L-1`` (same modules, same
    cache indices; the config's per-layer attention types are sliced to match)."""
    base = model._model.base_model
    cfg = base.config
    saved = (base.layers, cfg.num_hidden_layers, getattr(cfg, "layer_types", None))
    try:
        base.layers = torch.nn.ModuleList(list(saved[0])[b:])
        cfg.num_hidden_layers = saved[1] - b
        if saved[2] is not None:
            cfg.layer_types = list(saved[2])[b:]
        yield
    finally:
        base.layers = saved[0]
        cfg.num_hidden_layers = saved[1]
        if saved[2] is not None:
            cfg.layer_types = saved[2]


def _final_from(model, mods, b: int, x: torch.Tensor, position_ids, cache) -> torch.Tensor:
    """The final norm's output at the last position ``[R, d]`` of a forward that enters block ``b`` with the
    residual stream ``x`` ``[R, T, d]`` (continuing ``cache``, which holds every layer's earlier keys)."""
    R, T, _ = x.shape
    past = 0 if cache is None else cache.get_seq_length()
    dev = next(mods["base"].parameters()).device
    with _from_layer(model, b):
        out = mods["base"](inputs_embeds=x.to(dev), position_ids=position_ids.to(dev),
                           attention_mask=torch.ones(R, past + T, dtype=torch.long, device=dev),
                           cache=cache, use_cache=cache is not None)
    return out.last_hidden_state[:, -1]


def subject_embedding_std(model, batch: Batch, spans: torch.Tensor) -> float:
    """Standard deviation of the input embeddings (as the first layer receives them: Gemma's scaled
    ones) over every subject token of the batch, all dimensions pooled (ROME's noise scale)."""
    if getattr(model, "lmbook_remote", False):
        with torch.no_grad(), trace(model, batch, last_only=True):
            emb = model.embed_tokens.output.save()
        emb = emb.cpu()
        vals = [emb[i, int(s):int(e)].flatten() for i, (s, e) in enumerate(spans.tolist())]
        return float(torch.cat(vals).float().std())
    emb_mod = _modules(model)["embed"]
    with torch.no_grad():
        vals = []
        for i, (s, e) in enumerate(spans.tolist()):
            ids = batch.input_ids[i:i + 1, int(s):int(e)].to(emb_mod.weight.device)
            vals.append(emb_mod(ids).float().flatten().cpu())
    return float(torch.cat(vals).std())


def _check(model, prompt: Batch, span, noise, samples, window, kinds, positions, layers):
    if len(prompt) != 1:
        raise ParameterError("causal_trace takes one prompt")
    check_float("noise", noise, 0.0)
    check_int("samples", samples, 1, 1000)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ParameterError(f"unknown causal-tracing kinds {list(kinds)}; valid: {list(KINDS)}")
    L = model.num_layers
    wins = layer_windows(L, window, "window")
    n = int(prompt.last[0]) + 1
    s, e = int(span[0]), int(span[1])
    if not 0 < s < e <= n:
        raise ParameterError(f"subject span [{s}, {e}) must lie in 1..{n}: position 0 is the start token, "
                             "which is never noised (encode prompts with start=True)")
    positions = list(range(s, n)) if positions is None else [int(p) for p in positions]
    if not positions or any(not 0 <= p < n for p in positions) or len(set(positions)) != len(positions):
        raise ParameterError(f"positions must be distinct token positions in 0..{n - 1}, got {positions}")
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    if not layers or any(not 0 <= x < L for x in layers) or len(set(layers)) != len(layers):
        raise ParameterError(f"layers must be distinct layers in 0..{L - 1}, got {layers}")
    return n, s, e, positions, layers, wins


def _touched(kind: str, layer: int, wins) -> list[int]:
    return [layer] if kind == "hidden" else wins[layer]


def _eps(samples: int, width: int, d: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, width, d, generator=g) * noise  # [S, subject tokens, d]


def _noise_plan(rows: torch.Tensor, sample_of_row: torch.Tensor, eps: torch.Tensor, s: int, e: int, start: int):
    """Noise for the embeddings of a forward of the positions ``start..``: the subject's positions that
    it holds, each row with its own sample's draw."""
    lo = max(s, start)
    if lo >= e:
        return None
    local = torch.arange(lo - start, e - start)
    return rows, local, eps[sample_of_row][:, lo - s:e - s]


def _clean_and_corrupt(model, hooks, ids, s, e, eps, target):
    """One forward: row 0 clean, rows ``1..S`` corrupted. Returns clean states ``{kind: [L, n, d]}``,
    ``p`` ``[1 + S]`` and the keys and values (a DynamicCache of all ``1 + S`` rows)."""
    S = eps.shape[0]
    n = ids.shape[1]
    rows = torch.arange(1, S + 1)
    hooks.noise = (rows, torch.arange(s, e), eps)
    hooks.restore = {}
    hooks.record = {k: [] for k in KINDS}
    with torch.no_grad():
        dev = next(hooks.mods["base"].parameters()).device
        out = hooks.mods["base"](input_ids=ids.repeat(1 + S, 1).to(dev), position_ids=torch.arange(n)[None].to(dev),
                                 attention_mask=torch.ones(1 + S, n, dtype=torch.long, device=dev), use_cache=True)
    clean = {k: torch.stack([h[0] for h in hooks.record[k]]) for k in KINDS}
    # the residual stream entering each layer (and, last, the final norm) in every row: [L + 1, 1 + S, n, d]
    inputs = torch.stack([hooks.record["embed"]] + hooks.record["hidden"])
    hooks.record = None
    hooks.noise = None
    probs = target_probs(model, out.last_hidden_state[:, -1], torch.full((1 + S,), target))
    return clean, probs, out.cache, inputs


def _sub_cache(model, cache, rows: torch.Tensor, upto: int):
    """A new DynamicCache holding rows ``rows`` and positions ``< upto`` of ``cache``."""
    from transformers import DynamicCache

    kv = []
    for layer in cache.layers:
        r = rows.to(layer.keys.device)
        kv.append((layer.keys[r, :, :upto].contiguous(), layer.values[r, :, :upto].contiguous()))
    return DynamicCache(kv, config=getattr(model._model, "config", None))


def causal_trace(model, prompt: Batch, span: tuple[int, int], target: int, noise: float,
                 samples: int = 5, window: int = 10, positions: list[int] | None = None,
                 kinds=KINDS, seed: int = 0, layers: list[int] | None = None, max_rows: int = 512,
                 cache: bool = True, bands: int = 4) -> TraceResult:
    """Causal tracing of one prompt (``prompt`` holds one row, encoded with its start token) with the
    subject's tokens ``span`` ``[start, end)`` noised (``start >= 1``: never the start token); see the
    module docstring.

    ``positions``: token positions to restore (default: every position from the subject's first token
    on); ``layers``: the layers restored (``hidden``) or window centres (``mlp``, ``attention``), default
    all; ``noise=0`` makes the corrupted run the clean one. Noise draws: ``samples`` draws of shape
    ``[subject tokens, d]`` from a generator seeded ``seed``. At most ``max_rows`` rows per forward.
    ``cache=False`` runs every row over the whole prompt instead of continuing the cached keys and
    values of the positions before the restored one (same numbers; the benchmark's measure of that lever).
    ``bands``: a restoration changes nothing below the first layer it touches, so the rows at a position
    are split into up to ``bands`` groups by that layer, and each group's forward starts at the lowest
    layer of its group, from the corrupted run's residual stream there (``bands=1``: every forward
    starts at the first layer; models with a learned position embedding always do).
    """
    n, s, e, positions, layers, wins = _check(model, prompt, span, noise, samples, window, kinds, positions,
                                              layers)
    check_int("max_rows", max_rows, 1)
    if getattr(model, "lmbook_remote", False):  # no cache can be kept between remote requests
        return _causal_trace_traced(model, prompt, n, s, e, target, noise, samples, positions, layers, wins, kinds,
                                    seed)
    L, d = model.num_layers, model.hidden_size
    ids = prompt.input_ids[:1, :n]
    eps = _eps(samples, e - s, d, noise, seed)
    last = n - 1
    eff = {k: torch.zeros(len(layers), len(positions)) for k in kinds}
    with _Hooks(model) as hooks:
        clean, probs, kv, resid = _clean_and_corrupt(model, hooks, ids, s, e, eps, target)
        base = probs[1:]  # [S]
        nb = max(1, min(int(bands), L)) if cache and _can_start_mid(model) else 1
        starts = sorted({(L * q) // nb for q in range(nb)})  # the layers a forward may start at
        for j, p in enumerate(positions):
            # restorations that reach the last position (the others change nothing there: effect 0)
            items = [(k, i, l) for k in kinds for i, l in enumerate(layers)
                     if p == last or min(_touched(k, l, wins)) < L - 1]
            if not items:
                continue
            groups: dict[int, list] = {}
            for it in items:  # by the layer the forward starts at: the last start at or below the first touched
                first = min(_touched(it[0], it[2], wins))
                groups.setdefault(max(b for b in starts if b <= first), []).append(it)
            per = max(1, max_rows // samples)
            chunks = [(b, g[c:c + per]) for b, g in sorted(groups.items()) for c in range(0, len(g), per)]
            for b, chunk in chunks:
                R = samples * len(chunk)
                sample_of_row = torch.arange(samples).repeat_interleave(len(chunk))  # row = sample-major
                start = p if cache else 0  # the forward runs positions start..last
                hooks.restore = {}
                for m, (k, _, l) in enumerate(chunk):
                    rows = torch.arange(samples) * len(chunk) + m
                    for layer in _touched(k, l, wins):
                        prev = hooks.restore.get((k, layer))
                        r = rows if prev is None else torch.cat([prev[0], rows])
                        hooks.restore[(k, layer)] = (r, p - start, clean[k][layer][p].expand(len(r), d))
                sub = _sub_cache(model, kv, 1 + sample_of_row, start) if start > 0 else None
                with torch.no_grad():
                    if b == 0:
                        hooks.noise = _noise_plan(torch.arange(R), sample_of_row, eps, s, e, start)
                        h = _final_states(model, hooks.mods, ids[:, start:].repeat(R, 1),
                                          torch.arange(start, n)[None], sub)
                    else:  # the corrupted run's residual stream entering block b, noise included
                        hooks.noise = None
                        h = _final_from(model, hooks.mods, b, resid[b, 1 + sample_of_row, start:],
                                        torch.arange(start, n)[None], sub)
                pr = target_probs(model, h, torch.full((R,), target)).view(samples, len(chunk))
                gain = (pr - base[:, None]).mean(0)
                for m, (k, i, _) in enumerate(chunk):
                    eff[k][i, j] = gain[m]
        hooks.restore, hooks.noise = {}, None
    return TraceResult(list(positions), eff, float(probs[0]), float(base.mean()), list(layers), base)


def _causal_trace_traced(model, prompt, n, s, e, target, noise, samples, positions, layers, wins, kinds, seed):
    """:func:`causal_trace` for a model traced remotely (NDIF, or its local simulation): the clean states
    in one trace, then every restoration of every sample as a row of one traced forward of the whole
    prompt (no cache; the same numbers)."""
    L, d = model.num_layers, model.hidden_size
    with torch.no_grad(), trace(model, prompt, last_only=True):
        c_attn, c_mlp, c_hidden = list().save(), list().save(), list().save()
        for layer in range(L):
            c_attn.append(model.attentions_output[layer][0])
            c_mlp.append(model.mlps_output[layer][0])
            c_hidden.append(model.layers_output[layer][0])
        p_clean = final_logits(model, prompt, last_only=True).float().softmax(-1)[0, target].save()
    clean = {k: torch.stack([x.cpu() for x in v]) for k, v in
             (("attention", c_attn), ("mlp", c_mlp), ("hidden", c_hidden))}
    plan = [(k, i, l, j, p) for k in kinds for i, l in enumerate(layers) for j, p in enumerate(positions)]
    per = 1 + len(plan)
    R = samples * per
    eps = _eps(samples, e - s, d, noise, seed).repeat_interleave(per, 0)
    restore: dict = {}
    for smp in range(samples):
        for m, (k, _, l, _, p) in enumerate(plan):
            for layer in _touched(k, l, wins):
                restore.setdefault((k, layer), ([], []))
                restore[(k, layer)][0].append(smp * per + 1 + m)
                restore[(k, layer)][1].append(p)
    mods = {"attention": model.attentions_output, "mlp": model.mlps_output, "hidden": model.layers_output}
    rep = prompt.select([0] * R)
    with torch.no_grad(), trace(model, rep, last_only=True):
        emb = model.embed_tokens.output
        emb[:, s:e] = emb[:, s:e] + eps.to(emb.device, emb.dtype)
        for layer in range(L):
            for kind in ("attention", "mlp", "hidden"):  # the order the model computes them in
                if (kind, layer) in restore:
                    rows, pos = restore[(kind, layer)]
                    h = mods[kind][layer]
                    h[torch.tensor(rows), torch.tensor(pos)] = clean[kind][layer][torch.tensor(pos)].to(h.device,
                                                                                                        h.dtype)
        probs = final_logits(model, rep, last_only=True).float().softmax(-1)[:, target].save()
    probs = probs.detach().cpu().reshape(samples, per)
    base = probs[:, 0]
    gain = (probs[:, 1:] - base[:, None]).mean(0)
    eff = {k: torch.zeros(len(layers), len(positions)) for k in kinds}
    for m, (k, i, _, j, _) in enumerate(plan):
        eff[k][i, j] = gain[m]
    return TraceResult(list(positions), eff, float(p_clean.detach()), float(base.mean()), list(layers), base)


def causal_trace_looped(model, prompt: Batch, span: tuple[int, int], target: int, noise: float,
                        samples: int = 5, window: int = 10, positions: list[int] | None = None,
                        kinds=KINDS, seed: int = 0, layers: list[int] | None = None) -> TraceResult:
    """The same numbers as :func:`causal_trace`, the plain way: one full forward of the whole prompt per
    noise sample and restoration (every restoration run, none skipped), probabilities from the model's
    own logits (the reference the tests and the benchmark check the batched, cached path against)."""
    n, s, e, positions, layers, wins = _check(model, prompt, span, noise, samples, window, kinds, positions,
                                              layers)
    d = model.hidden_size
    ids = prompt.input_ids[:1, :n]
    eps = _eps(samples, e - s, d, noise, seed)
    hf = model._model
    dev = next(hf.parameters()).device

    def run() -> float:
        with torch.no_grad():
            z = hf(input_ids=ids.to(dev)).logits[0, -1].float()
        return float(z.softmax(-1)[target])

    eff = {k: torch.zeros(len(layers), len(positions)) for k in kinds}
    with _Hooks(model) as hooks:
        clean_rec = {k: [] for k in KINDS}
        hooks.record = clean_rec
        p_clean = run()
        hooks.record = None
        clean = {k: torch.stack([h[0] for h in clean_rec[k]]) for k in KINDS}
        base = torch.zeros(samples)
        for i in range(samples):
            hooks.noise = (torch.tensor([0]), torch.arange(s, e), eps[i:i + 1])
            hooks.restore = {}
            base[i] = run()
            for j, p in enumerate(positions):
                for k in kinds:
                    for li, l in enumerate(layers):
                        hooks.restore = {(k, layer): (torch.tensor([0]), p, clean[k][layer][p][None])
                                         for layer in _touched(k, l, wins)}
                        eff[k][li, j] += (run() - base[i]) / samples
        hooks.restore, hooks.noise = {}, None
    return TraceResult(list(positions), eff, p_clean, float(base.mean()), list(layers), base)


# ---------------------------------------------------------------- many facts


def _peak_of_mean(e: np.ndarray) -> float:
    """Index of the largest mean over facts of ``e`` ``[F, L']`` (NaNs skipped); NaN when all are NaN."""
    mean = np.nanmean(e, 0)
    return math.nan if np.isnan(mean).all() else float(np.nanargmax(mean))


def _max_of_mean(e: np.ndarray) -> float:
    mean = np.nanmean(e, 0)
    return math.nan if np.isnan(mean).all() else float(np.nanmax(mean))


@dataclasses.dataclass
class CausalTracingRun:
    """Causal tracing of ``F`` facts (:func:`run_causal_tracing`).

    * ``effects[kind]``: ``[F, L', 6]`` indirect effect (restored minus corrupted probability, mean over
      noise samples) for each restored layer ``layers`` (window centres for ``mlp``/``attention``) and
      each of ROME's categories :data:`CATEGORIES` (mean over the category's positions; NaN where a fact
      has no such position)
    * ``p_clean`` / ``p_corrupt``: ``[F]`` the answer's probability, clean and corrupted (mean over samples)
    * ``noise``: the noise standard deviation; ``samples``, ``window``: the protocol's settings
    * ``traces``: each fact's :class:`TraceResult` (every restored position); ``categories``: each fact's
      positions per category (:func:`rome_categories`); ``tokens``: each fact's tokens, decoded
    """

    effects: dict[str, np.ndarray]
    p_clean: np.ndarray
    p_corrupt: np.ndarray
    noise: float
    layers: list[int]
    n_layers: int
    samples: int = 1
    window: int = 1
    traces: list[TraceResult] = dataclasses.field(default_factory=list)
    categories: list[dict[str, list[int]]] = dataclasses.field(default_factory=list)
    tokens: list[list[str]] = dataclasses.field(default_factory=list)

    @property
    def n_facts(self) -> int:
        return len(self.p_clean)

    def depth(self, layer) -> float:
        """Relative depth of a layer, ``layer / (n_layers - 1)`` (0: first layer, 1: last)."""
        return float(layer) / max(1, self.n_layers - 1)

    def average_effect(self, kind: str) -> np.ndarray:
        """Average indirect effect over facts, ``[L', 6]`` (each category over the facts that have it)."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.effects[kind], axis=0)

    def category_counts(self, kind: str = "hidden") -> dict[str, int]:
        """How many facts have each category in the ``kind`` map (the unit count behind each heatmap row)."""
        e = self.effects[kind if kind in self.effects else next(iter(self.effects))]
        return {c: int((~np.isnan(e[:, 0, i])).sum()) for i, c in enumerate(CATEGORIES)}

    def interval(self, kind: str, n_boot: int = 1000, seed: int = 0):
        """Mean and 95% percentile-bootstrap interval over facts of every heatmap cell: ``(mean, low,
        high)``, each ``[L', 6]``; each category resamples the facts that have it (NaN bounds with fewer
        than two)."""
        e = self.effects[kind]
        mean = np.full(e.shape[1:], np.nan)
        low, high = mean.copy(), mean.copy()
        for c in range(e.shape[2]):
            x = e[~np.isnan(e[:, 0, c]), :, c]
            if len(x) >= 1:
                mean[:, c] = x.mean(0)
            if len(x) >= 2:
                _, low[:, c], high[:, c] = bootstrap_ci(x, n_boot=n_boot, seed=seed)
        return mean, low, high

    def interval_width(self, kind: str, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
        """Width of each cell's 95% bootstrap interval over facts, ``[L', 6]``."""
        _, low, high = self.interval(kind, n_boot, seed)
        return high - low

    def _curve(self, kind: str, position: str) -> np.ndarray:
        if kind not in self.effects:
            raise ParameterError(f"kind={kind!r} was not traced; traced: {list(self.effects)}")
        return self.effects[kind][:, :, _category(position)]

    def peak_layer(self, kind: str, position: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """The layer (window centre) where the average indirect effect of restoring ``kind`` at ``position``
        (a category of :data:`CATEGORIES`, or its alias in :data:`ALIASES`) peaks, with a 95% bootstrap
        interval over facts; NaN with fewer than two facts or when no fact has that position."""
        lay = np.asarray(self.layers, dtype=float)

        def stat(x):
            i = _peak_of_mean(x)
            return math.nan if math.isnan(i) else float(lay[int(i)])

        return bootstrap_stat(self._curve(kind, position), stat, n_boot, seed)

    def peak_depth(self, kind: str, position: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """:meth:`peak_layer` as a relative depth (:meth:`depth`)."""
        e = self.peak_layer(kind, position, n_boot, seed)
        if e.missing:
            return e
        return Estimate(self.depth(e.value), self.depth(e.low), self.depth(e.high))

    def peak_effect(self, kind: str, position: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """The largest average indirect effect over layers of restoring ``kind`` at ``position`` (the peak
        of the fact-averaged curve), with a 95% bootstrap interval over facts."""
        return bootstrap_stat(self._curve(kind, position), _max_of_mean, n_boot, seed)

    def peak_difference(self, a: tuple[str, str] = ("mlp", "last subject token"),
                        b: tuple[str, str] = ("attention", "last token"), n_boot: int = 1000,
                        seed: int = 0) -> Estimate:
        """Peak average indirect effect of site ``a`` minus that of site ``b`` (each ``(kind, position)``),
        with a paired 95% bootstrap interval: each resample of facts recomputes both peaks. Facts lacking
        either position are left out. ROME's headline: the MLP at the last subject token (middle layers)
        against attention at the last token."""
        x, y = self._curve(*a), self._curve(*b)
        keep = ~np.isnan(x[:, 0]) & ~np.isnan(y[:, 0])
        both = np.concatenate([x[keep], y[keep]], axis=1)
        k = x.shape[1]
        return bootstrap_stat(both, lambda z: _max_of_mean(z[:, :k]) - _max_of_mean(z[:, k:]), n_boot, seed)

    def corruption_drop(self, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """Mean of ``p_clean - p_corrupt`` over facts (how much corrupting the subject lowers the answer's
        probability), with a 95% bootstrap interval over facts; NaN with fewer than two facts."""
        return bootstrap_stat(self.p_clean - self.p_corrupt, np.mean, n_boot, seed)

    def headline(self, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
        """ROME's headline numbers with 95% bootstrap intervals over facts: the peak average indirect
        effect of the MLP at the last subject token (``mlp_subject_last``) and of attention at the last
        token (``attention_last``), their paired difference (``mlp_minus_attention``), and the peak's
        layer and relative depth for the MLP (``mlp_subject_last_layer``, ``mlp_subject_last_depth``)."""
        mlp, att = ("mlp", "last subject token"), ("attention", "last token")
        return {"mlp_subject_last": self.peak_effect(*mlp, n_boot, seed),
                "attention_last": self.peak_effect(*att, n_boot, seed),
                "mlp_minus_attention": self.peak_difference(mlp, att, n_boot, seed),
                "mlp_subject_last_layer": self.peak_layer(*mlp, n_boot, seed),
                "mlp_subject_last_depth": self.peak_depth(*mlp, n_boot, seed),
                "attention_last_layer": self.peak_layer(*att, n_boot, seed)}

    def head(self, k: int) -> "CausalTracingRun":
        """The same run restricted to its first ``k`` facts."""
        return dataclasses.replace(self, effects={n: e[:k] for n, e in self.effects.items()},
                                   p_clean=self.p_clean[:k], p_corrupt=self.p_corrupt[:k],
                                   traces=self.traces[:k], categories=self.categories[:k], tokens=self.tokens[:k])

    def summary(self) -> dict:
        """Mean clean and corrupted probabilities, the protocol's settings, and for each kind the peak of
        the average indirect effect (value, layer, category) overall, at the last subject token and at
        the last token."""
        out = {"n_facts": self.n_facts, "samples": self.samples, "window": self.window, "noise": self.noise,
               "n_layers_restored": len(self.layers), "n_layers": self.n_layers,
               "p_clean": float(self.p_clean.mean()), "p_corrupt": float(self.p_corrupt.mean())}
        for kind in self.effects:
            aie = self.average_effect(kind)  # [L', 6]
            if np.isnan(aie).all():
                continue
            i, c = np.unravel_index(np.nanargmax(aie), aie.shape)
            out[f"{kind}_peak"] = float(aie[i, c])
            out[f"{kind}_peak_layer"] = int(self.layers[i])
            out[f"{kind}_peak_position"] = CATEGORIES[c]
            for key, cat in (("subject_last", "last subject token"), ("last", "last token")):
                col = aie[:, CATEGORIES.index(cat)]
                out[f"{kind}_{key}_peak"] = float(np.nanmax(col))
                out[f"{kind}_{key}_peak_layer"] = int(self.layers[int(np.nanargmax(col))])
        return out


# What the chapter records when nothing was traced (no facts), so that its text still renders.
EMPTY_SUMMARY = {"p_clean": float("nan"), "p_corrupt": float("nan"), "mlp_subject_last_peak": float("nan"),
                 "mlp_subject_last_peak_layer": -1, "attention_peak": float("nan"), "attention_peak_layer": -1,
                 "hidden_subject_last_peak": float("nan"), "attention_peak_position": "none",
                 "attention_last_peak": float("nan"), "attention_last_peak_layer": -1}


def restoration_window(n_layers: int, fraction: float) -> int:
    """The MLP/attention restoration window at the same relative depth as ROME's: ``round(fraction *
    n_layers)`` layers, at least 1 (``fraction = 10 / 48`` is ROME's 10 of GPT-2 XL's 48 layers)."""
    check_float("window_fraction", fraction, 1e-9, 1.0)
    return max(1, min(n_layers, round(fraction * n_layers)))


def spread_layers(n_layers: int, count: int = 0) -> list[int]:
    """``count`` layers spread evenly from the first to the last (rounded; ``count=0`` or ``count >=
    n_layers``: every layer, ROME's protocol). Models of different depths restore the same relative
    depths."""
    check_int("layer_count", count, 0)
    if count == 0 or count >= n_layers:
        return list(range(n_layers))
    if count == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def trace_layers(n_layers: int, stride: int = 1) -> list[int]:
    """The layers (window centres) restored with ``stride``: every ``stride``-th layer from the first,
    always including the last (``stride=1``: every layer, ROME's protocol)."""
    check_int("layer_stride", stride, 1, max(1, n_layers))
    out = list(range(0, n_layers, stride))
    return out if out[-1] == n_layers - 1 else out + [n_layers - 1]


def run_causal_tracing(model, facts: Sequence[Fact], noise_factor: float = 3.0, samples: int = 10,
                       window: int = 10, seed: int = 0, layer_stride: int = 1, kinds=KINDS,
                       max_rows: int = 512, progress: bool = True, layers: Sequence[int] | None = None,
                       bands: int = 4, rows: Sequence[str] = CATEGORIES,
                       noise_std: float | None = None) -> CausalTracingRun:
    """ROME's causal tracing of each fact (chapter 2). Prompts are encoded with the start token; the
    noise has ``noise_factor`` times the standard deviation of the facts' subject-token embeddings
    (ROME: 3) and ``samples`` draws per fact (ROME: 10; fact ``i`` seeded ``seed + i``); every position
    from the subject's first token to the last is restored, for each of ``kinds``, at every
    ``layer_stride``-th layer (:func:`trace_layers`; ROME: 1) or at ``layers`` when given (say
    :func:`spread_layers`), with MLP and attention outputs restored in
    windows of ``window`` layers (ROME: 10). Effects are summarised in ROME's categories
    (:data:`CATEGORIES`). One batched forward per fact and restored position (:func:`causal_trace`).

    ``rows``: the categories whose positions are restored (default all of ROME's); the others stay NaN.
    Restoring only ``("last subject token", "last token")`` pays for many more facts and noise draws:
    a last-token restoration recomputes one position only. ``noise_std``: the noise's standard deviation
    itself, instead of ``noise_factor`` times the one measured on ``facts`` (to rerun some facts with
    another run's noise, as :func:`precision_check` does)."""
    from tqdm.auto import tqdm

    facts = list(facts)
    if not facts:
        raise ParameterError("run_causal_tracing needs at least one fact")
    check_float("noise_factor", noise_factor, 0.0)
    check_int("samples", samples, 1, 1000)
    check_int("window", window, 1, model.num_layers)
    rows = tuple(rows)
    bad = [r for r in rows if r not in CATEGORIES]
    if not rows or bad:
        raise ParameterError(f"rows must be a non-empty subset of {list(CATEGORIES)}; got {list(rows)}")
    if layers is None:
        layers = trace_layers(model.num_layers, layer_stride)
    else:
        layers = sorted({int(x) for x in layers})
        if not layers or not all(0 <= x < model.num_layers for x in layers):
            raise ParameterError(f"layers must be layers of the model, 0..{model.num_layers - 1}; got {layers}")
    b = encode(model, [f.prompt for f in facts], start=True)
    spans = torch.tensor([token_span(b, i, f.subject) for i, f in enumerate(facts)])
    if noise_std is None:
        noise = noise_factor * subject_embedding_std(model, b, spans)
    else:
        noise = check_float("noise_std", noise_std, 0.0)
    target = answer_token_ids(model, facts)
    eff = {k: np.full((len(facts), len(layers), len(CATEGORIES)), np.nan) for k in kinds}
    pc, pk, traces, cats, toks = [], [], [], [], []
    for i in tqdm(range(len(facts)), desc="causal tracing", disable=not progress):
        one = b.select([i])
        last = int(one.last[0])
        span = tuple(int(x) for x in spans[i])
        cat = rome_categories(span, last)
        restore = sorted({p for name in rows for p in cat[name]})
        r = causal_trace(model, one, span, int(target[i]), noise, samples=samples, window=window, kinds=kinds,
                         seed=seed + i, layers=layers, max_rows=max_rows, bands=bands, positions=restore)
        for kind in kinds:
            for c, name in enumerate(CATEGORIES):
                cols = [r.positions.index(p) for p in cat[name] if name in rows]
                if cols:
                    eff[kind][i, :, c] = r.effects[kind][:, cols].mean(1).numpy()
        pc.append(r.p_clean)
        pk.append(r.p_corrupt)
        traces.append(r)
        cats.append(cat)
        toks.append(decode_tokens(model, one.input_ids[0, :last + 1]))
    return CausalTracingRun(eff, np.array(pc), np.array(pk), noise, layers, model.num_layers, samples, window,
                            traces, cats, toks)


def precision_check(fast: CausalTracingRun, exact: CausalTracingRun, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """How much running causal tracing in a lower precision (``fast``, say a bfloat16 copy of the model
    from :func:`lmbook.core.models.load_copy`) changes it, against ``exact`` (the same facts, noise
    draws and noise scale in float32: ``run_causal_tracing(..., noise_std=fast.noise)`` on the first
    facts of ``fast``). Over the facts ``exact`` has:

    * ``max_difference``: the largest absolute difference between the two runs' fact-averaged maps
      (every kind, layer and category), in units of probability;
    * ``max_effect``: the largest absolute fact-averaged effect of ``exact``;
    * ``half_width``: the median half-width of ``fast``'s 95% bootstrap intervals over all its facts
      (every kind and cell): the sampling uncertainty the precision change is set against;
    * ``headline_fast`` / ``headline_exact``: ``mlp_minus_attention`` of both runs on those facts;
    * ``n_facts``: how many facts were compared.
    """
    k = exact.n_facts
    if k == 0 or fast.n_facts < k or fast.layers != exact.layers or set(fast.effects) != set(exact.effects):
        raise ParameterError("precision_check needs an exact run on the first facts, layers and kinds of the fast run")
    sub = fast.head(k)
    diffs, effs, widths = [], [], []
    for kind in exact.effects:
        d = sub.average_effect(kind) - exact.average_effect(kind)
        diffs.append(np.nanmax(np.abs(d)) if not np.isnan(d).all() else 0.0)
        effs.append(np.nanmax(np.abs(exact.average_effect(kind))) if not np.isnan(d).all() else 0.0)
        w = fast.interval_width(kind, n_boot, seed) / 2
        widths.append(w[~np.isnan(w)])
    w = np.concatenate(widths)
    hf = sub.peak_difference(n_boot=n_boot, seed=seed).value
    he = exact.peak_difference(n_boot=n_boot, seed=seed).value
    return {"n_facts": k, "max_difference": float(max(diffs)), "max_effect": float(max(effs)),
            "half_width": float(np.median(w)) if len(w) else math.nan,
            "headline_fast": float(hf), "headline_exact": float(he)}
