"""Benchmark suite: every chapter's dominant computation against its naive reference and its floor.

For each case, on the same inputs and side by side in one process:

* **library**: the library's implementation, as the chapter calls it (smaller counts);
* **naive**: the plain way, where there is one: one forward per intervention (the library's own
  code with ``max_rows`` set to one copy, or one trace per layer), one generate per prompt,
  the full model where the library caches lower layers;
* **floor**: a plain batched forward of the same tokens with no intervention (``transformers``,
  no nnsight), reading the same positions; for generation ``generate`` of the same batch; for
  training the same forward and backward without the optimiser.

Some cases also time a *lever*: what a proposed change to the library would cost (say, running the
shared prefix once and feeding only the last token of every copy, as the attention knockout does).
Outputs are compared (maximum absolute difference of log-probabilities or probabilities, or equal
token ids for generation); a case whose outputs disagree beyond its tolerance fails the run.

Usage::

    python bench/suite.py --all [--threads 1] [--repeats 3] [--write]
    python bench/suite.py --chapter 2 --chapter 6 [--case knockout]

``--write`` merges the measured rows into ``bench/results.json`` and rewrites the table of
``bench/README.md`` between its markers (``make bench`` does this).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"

GEMMA, SMOL = "gemma-3-270m", "smollm2-135m-instruct"
CASE_FILTER: str | None = None  # --case: run only cases whose name contains it


# ---------------------------------------------------------------- timing and agreement


def best_of(fn: Callable, repeats: int):
    """``(best wall time over repeats, last output)``."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def maxdiff(a, b) -> float:
    """Largest absolute difference of two tensors (or lists of tensors), NaN-safe (NaN == NaN)."""
    if isinstance(a, (list, tuple)):
        return max((maxdiff(x, y) for x, y in zip(a, b)), default=0.0)
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    d = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    return float(torch.where(both_nan, torch.zeros_like(d), d).max()) if d.numel() else 0.0


@dataclasses.dataclass
class Result:
    chapter: int
    case: str
    model: str
    size: str
    times: dict  # name -> seconds: "library", "naive", "floor", and any levers
    agreement: str
    ok: bool
    floor: str  # what the floor is
    levers: dict = dataclasses.field(default_factory=dict)  # lever name -> what it is

    def ratio(self, a: str, b: str) -> float | None:
        ta, tb = self.times.get(a), self.times.get(b)
        return None if ta is None or tb is None or tb == 0 else ta / tb


def wanted(case: str) -> bool:
    """Whether ``--case`` selects ``case`` (cases that need a set-up of their own check it first)."""
    return not CASE_FILTER or CASE_FILTER in case


def run_case(chapter, case, model_name, size, floor_desc, library, floor, naive=None, levers=None, *,
             repeats: int, agree: Callable, naive_repeats: int = 1) -> Result | None:
    """Time ``library``, ``floor`` (interleaved, best of ``repeats``), ``naive`` and each lever, then
    ``agree(outputs) -> (text, ok)`` on the dict of outputs."""
    if not wanted(case):
        return None
    levers = levers or {}
    print(f"  {case} ...", flush=True)
    out = {"library": library()}  # warm-up, and the output compared
    tl, tf = [], []
    for _ in range(max(1, repeats)):
        t, out["library"] = best_of(library, 1)
        tl.append(t)
        t, out["floor"] = best_of(floor, 1)
        tf.append(t)
    times = {"library": min(tl), "floor": min(tf)}
    if naive is not None:
        times["naive"], out["naive"] = best_of(naive, naive_repeats)
    for name, (fn, _) in levers.items():
        times[name], out[name] = best_of(fn, repeats)
    text, ok = agree(out)
    return Result(chapter, case, model_name, size, times, text, ok, floor_desc,
                  {k: d for k, (_, d) in levers.items()})


# ---------------------------------------------------------------- plain transformers: the floors


def hf(model):
    return model._model


def plain_last(model, batch) -> torch.Tensor:
    """Floor of a last-token reading: one plain forward of ``batch``, the final norm's output at each
    row's own last token unembedded; log-probabilities ``[B, vocab]``."""
    from lmbook.mechanisms.readout import softcap

    m = hf(model)
    with torch.no_grad():
        h = m.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        z = m.get_output_embeddings()(h[torch.arange(len(batch)), batch.last])
        return softcap(model, z.float()).log_softmax(-1)


def plain_layer_outputs(model, batch) -> list[torch.Tensor]:
    """The residual stream after every block, ``L`` tensors ``[B, T, d]``, from one plain forward (hooks)."""
    from lmbook.mechanisms.training import layer_modules

    outs, handles = [], []
    for mod in layer_modules(model):
        handles.append(mod.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            hf(model).get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return outs


def plain_lens(model, batch, pos: torch.Tensor, k: int, targets=None):
    """Floor of the logit lens: one plain forward, then final norm and unembedding of every layer at
    ``pos`` ``[B, P]``; returns ``(target log-probs [L, B, P, T] or None, top ids, top probs)``."""
    from lmbook.mechanisms.readout import softcap

    norm, head = model.ln_final._module, hf(model).get_output_embeddings()
    rows = torch.arange(len(batch))[:, None].expand_as(pos)
    tl, ti, tp = [], [], []
    with torch.no_grad():
        for h in plain_layer_outputs(model, batch):
            lp = softcap(model, head(norm(h[rows, pos.clamp(min=0)])).float()).log_softmax(-1)
            if targets is not None:
                tl.append(lp.gather(-1, targets[:, None, :].expand(*pos.shape, -1)))
            top = lp.topk(k, dim=-1)
            ti.append(top.indices)
            tp.append(top.values.exp())
    return (torch.stack(tl) if targets is not None else None), torch.stack(ti), torch.stack(tp)


def plain_generate(model, batch, n: int) -> torch.Tensor:
    """Floor of greedy decoding: transformers' ``generate`` of the same left-padded batch, ``n`` new tokens."""
    from lmbook.core.tokens import pad_token_id

    with torch.no_grad():
        out = hf(model).generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad_token_id(model))
    return out[:, batch.input_ids.shape[1]:]


def prefix_floor(model, batch, copies: int) -> torch.Tensor:
    """Floor of a last-token intervention run against a cached prefix (the lever the attention
    knockout uses): rows grouped by length, each group's prompts minus their last token run once,
    then only the last token of ``copies`` copies of every prompt, against that cache. Returns
    last-token log-probabilities ``[copies * B, vocab]`` in :func:`replicate`'s order (copy-major)."""
    from lmbook.mechanisms.readout import softcap

    m = hf(model)
    B = len(batch)
    out = torch.empty(copies * B, m.get_output_embeddings().weight.shape[0])
    lengths = (batch.last + 1).tolist()
    with torch.no_grad():
        for n in sorted(set(lengths)):
            idx = [i for i, x in enumerate(lengths) if x == n]
            ids = batch.input_ids[idx, :n]
            if n > 1:
                cache = m(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
                cache.reorder_cache(torch.arange(len(idx)).repeat(copies))
            else:
                cache = None
            last = ids[:, -1:].repeat(copies, 1)
            z = m(input_ids=last, attention_mask=torch.ones(len(last), n, dtype=torch.long), past_key_values=cache,
                  use_cache=True).logits[:, -1]
            rows = torch.tensor([c * B + i for c in range(copies) for i in idx])
            out[rows] = softcap(model, z.float()).log_softmax(-1)
    return out


# ---------------------------------------------------------------- models and data


class Models:
    """Each packaged model loaded once (on the CPU), with its load time."""

    def __init__(self):
        self.models, self.load_s = {}, {}

    def __call__(self, name: str):
        if name not in self.models:
            from lmbook.core.models import load_model

            t = time.perf_counter()
            self.models[name] = load_model(name, device="cpu")
            self.load_s[name] = time.perf_counter() - t
            print(f"  loaded {name} in {self.load_s[name]:.1f} s", flush=True)
        return self.models[name]


def known_facts(model, n: int, scan: int = 60):
    """The first ``n`` facts among the first ``scan`` that the model knows."""
    from lmbook.data.facts import load_facts
    from lmbook.experiments.recall import known_mask

    facts = load_facts(ROOT / "data/facts/facts.jsonl")[:scan]
    known = known_mask(model, facts)
    return [f for f, k in zip(facts, known.tolist()) if k][:n]


def task_split(name: str, n_val: int, n_test: int):
    from lmbook.data.tasks import load_tasks, split_task

    return split_task(load_tasks(ROOT / "data/tasks")[name], n_val, n_test, 10)


FACTS1 = ["The Eiffel Tower is located in the city of", "The Colosseum is located in the city of",
          "Big Ben is located in the city of", "The Statue of Liberty is located in the city of",
          "Michael Jordan plays the sport of", "The capital city of Japan is",
          "The official language of Brazil is",
          "Wolfgang Amadeus Mozart was a famous composer from the country of"]
ANSWERS1 = [" Paris", " Rome", " London", " New", " basketball", " Tokyo", " Portuguese", " Austria"]


def _fmt_diff(name: str, d: float, tol: float) -> tuple[str, bool]:
    return f"{name} {d:.1e}", d <= tol


# ---------------------------------------------------------------- chapter 1: the tour


def ch1(models: Models, a) -> list[Result]:
    from lmbook.core.models import trace
    from lmbook.core.tokens import encode, first_token_ids
    from lmbook.mechanisms.interventions import hidden_states, patch_sweep
    from lmbook.mechanisms.readout import _positions, final_logits, logit_lens

    model = models(GEMMA)
    L = model.num_layers
    out = []
    fb = encode(model, FACTS1)
    tg = first_token_ids(model, ANSWERS1)[:, None]
    pos = _positions(fb, None)

    def agree_lens(o):  # no naive: the lens reads every layer from one forward by construction
        df = maxdiff(o["library"].target_logprobs, o["floor"][0])
        same = bool((o["library"].top_ids == o["floor"][1]).all())
        return f"floor {df:.1e}, top-1 = floor: {same}", df < 1e-3 and same

    out.append(run_case(
        1, "logit lens over FACTS (last token, all layers)", GEMMA, f"{len(fb)} prompts x {L} layers",
        "plain forward + the same unembeddings",
        lambda: logit_lens(model, fb, targets=tg, k=1),
        lambda: plain_lens(model, fb, pos, 1, tg), repeats=a.repeats, agree=agree_lens))

    batch = encode(model, FACTS1[0])
    src = encode(model, FACTS1[1])
    tp = int(batch.last[0])

    def naive_patch():
        states = hidden_states(model, src, None)[:, 0]
        rows = []
        with torch.no_grad(), trace(model, batch, last_only=True):
            rows.append(final_logits(model, batch, last_only=True).float().log_softmax(-1).save())
        for l in range(L):
            with torch.no_grad(), trace(model, batch, last_only=True):
                h = model.layers_output[l]
                h[0, tp] = states[l].to(h.dtype)
                rows.append(final_logits(model, batch, last_only=True).float().log_softmax(-1).save())
        return torch.cat(rows)

    out.append(run_case(
        1, "patch sweep (last token, every layer)", GEMMA, f"1 prompt x {L + 1} runs",
        "plain forward of the L+1 copies",
        lambda: patch_sweep(model, src, batch),
        lambda: plain_last(model, batch.select([0] * (L + 1))),
        naive_patch,
        repeats=a.repeats,
        agree=lambda o: (lambda d, df: (f"naive {d:.1e}, floor (row 0) {df:.1e}", d < 1e-4 and df < 1e-3))(
            maxdiff(o["library"], o["naive"]), maxdiff(o["library"][0], o["floor"][0]))))
    return out


# ---------------------------------------------------------------- chapter 2: factual recall


def ch2(models: Models, a) -> list[Result]:
    from lmbook.core.models import load_copy
    from lmbook.core.tokens import encode, token_span
    from lmbook.data.facts import answer_token_ids, load_descriptions
    from lmbook.experiments.causal_tracing import causal_trace, subject_embedding_std
    from lmbook.experiments.recall import run_enrichment
    from lmbook.mechanisms.knockout import (
        KINDS,
        _plan,
        group_facts,
        knockout_sweep,
        knockout_sweep_looped,
        last_token_run,
        layer_windows,
        position_index,
    )
    from lmbook.mechanisms.readout import logit_lens

    model = models(GEMMA)
    L = model.num_layers
    facts = known_facts(model, max(a.facts, 4))
    out = []

    # attention knockout (formerly bench/knockout.py)
    chosen = facts[: a.facts]
    groups = group_facts(model, [f.prompt for f in chosen], [f.subject for f in chosen],
                         answer_token_ids(model, chosen))
    windows = layer_windows(L, 9)

    def plain_ko():
        res = []
        for g in groups:
            keep, _ = _plan(model, g, KINDS, windows)
            res.append(last_token_run(model, g, None, None, keep.shape[1])[0])
        return res

    out.append(run_case(
        2, "attention knockout sweep", GEMMA, f"{len(chosen)} facts x {len(KINDS)} kinds x {L} windows",
        "the same last-token batch against the cached prefix, no knockout",
        lambda: [knockout_sweep(model, g, KINDS, windows) for g in groups], plain_ko,
        lambda: [knockout_sweep_looped(model, g, KINDS, windows) for g in groups],
        repeats=a.repeats, agree=lambda o: _fmt_diff("naive", maxdiff(o["library"], o["naive"]), 1e-4)))

    # causal tracing: every restoration a row of one batched forward
    f = facts[0]
    b = encode(model, [f.prompt])
    span = tuple(token_span(b, 0, f.subject))
    noise = 3.0 * subject_embedding_std(model, b, torch.tensor([span]))
    named = position_index(b, torch.tensor([span]))[0].tolist()
    positions = [p for p in named if p >= 0][-a.trace_positions:]
    target = int(answer_token_ids(model, [f])[0])
    samples, window = a.noise_samples, 5
    plan = [(k, l, p) for k in ("hidden", "mlp", "attention") for l in range(L) for p in positions]
    R = samples * (1 + len(plan))

    def library_trace():
        r = causal_trace(model, b, span, target, noise, samples=samples, window=window, positions=positions)
        return torch.cat([r.effects[k].flatten() for k in ("hidden", "mlp", "attention")])

    def naive_trace():
        from lmbook.core.models import trace
        from lmbook.mechanisms.readout import final_logits

        wins = layer_windows(L, window)
        s, e = span
        with torch.no_grad(), trace(model, b, last_only=True):
            ca, cm, ch = list().save(), list().save(), list().save()
            for layer in range(L):
                ca.append(model.attentions_output[layer][0])
                cm.append(model.mlps_output[layer][0])
                ch.append(model.layers_output[layer][0])
        clean = {"attention": ca, "mlp": cm, "hidden": ch}
        mods = {"attention": model.attentions_output, "mlp": model.mlps_output, "hidden": model.layers_output}
        g = torch.Generator().manual_seed(0)
        eps = torch.randn(samples, e - s, model.hidden_size, generator=g) * noise
        probs = torch.empty(samples, 1 + len(plan))
        for i in range(samples):
            for j, item in enumerate([None] + plan):
                with torch.no_grad(), trace(model, b, last_only=True):
                    emb = model.embed_tokens.output
                    emb[:, s:e] = emb[:, s:e] + eps[i].to(emb.dtype)
                    if item is not None:
                        k, l, p = item
                        for layer in ([l] if k == "hidden" else wins[l]):
                            h = mods[k][layer]
                            h[0, p] = clean[k][layer][p].to(h.dtype)
                    pr = final_logits(model, b, last_only=True).float().softmax(-1)[0, target].save()
                probs[i, j] = float(pr)
        return (probs[:, 1:] - probs[:, :1]).mean(0)

    rep = b.select([0] * R)
    trace_case = "causal tracing restorations"
    fast = load_copy(model, "bfloat16") if wanted(trace_case) else None  # chapter 2's TRACE_DTYPE copy

    def bf16_trace():
        r = causal_trace(fast, b, span, target, noise, samples=samples, window=window, positions=positions)
        return torch.cat([r.effects[k].flatten() for k in ("hidden", "mlp", "attention")])

    def agree_trace(o):
        d, db = maxdiff(o["library"], o["naive"]), maxdiff(o["library"], o["bf16 copy"])
        return f"naive {d:.1e}, bf16 copy {db:.1e} (probability)", d < 1e-4 and db < 0.05

    out.append(run_case(
        2, trace_case, GEMMA,
        f"1 fact x {samples} noise x {len(plan)} restorations ({len(positions)} positions)",
        "plain forward of the same rows", library_trace,
        lambda: plain_last(model, rep), naive_trace,
        {"bf16 copy": (bf16_trace, "the same restorations on a bfloat16 copy (load_copy)")},
        repeats=a.repeats, agree=agree_trace))

    # enrichment: the logit lens at four positions, top-50, then the attributes rate in Python
    ef = facts[:4]
    eb = encode(model, [x.prompt for x in ef])
    spans = torch.tensor([token_span(eb, i, x.subject) for i, x in enumerate(ef)])
    pos = position_index(eb, spans)

    def agree_enrich(o):
        same = float((o["library"].top_ids == o["floor"][1]).float().mean())
        d = maxdiff(o["library"].top_probs, o["floor"][2])
        return f"floor {d:.1e}, top ids = floor {same:.3f}", d < 1e-3 and same > 0.99

    out.append(run_case(
        2, "enrichment lens (4 positions, top-50)", GEMMA, f"{len(ef)} facts x 4 positions x {L} layers",
        "plain forward + the same unembeddings and top-k",
        lambda: logit_lens(model, eb, positions=pos, k=50), lambda: plain_lens(model, eb, pos, 50),
        repeats=a.repeats, agree=agree_enrich))

    desc = load_descriptions(ROOT / "data/facts/subjects.jsonl")
    out.append(run_case(
        2, "run_enrichment (lens + attributes rate)", GEMMA, f"{len(ef)} facts",
        "its logit lens alone (the model's share)",
        lambda: run_enrichment(model, ef, desc, top_k=50).rates,
        lambda: logit_lens(model, eb, positions=pos, k=50),
        repeats=a.repeats, agree=lambda o: ("rates finite", bool(torch.isfinite(torch.as_tensor(
            o["library"])).any()))))
    return out


# ---------------------------------------------------------------- chapter 3: perplexity and training


def ch3(models: Models, a) -> list[Result]:
    from lmbook.data.corpora import segment_text
    from lmbook.mechanisms.likelihood import encode_texts, length_batches, logits_nll, token_nll
    from lmbook.mechanisms.training import (
        _cached_forward,
        _rows,
        cached_nll,
        prefix_states,
        restore_after,
        shuffled_batches,
        skip_lower_layers,
        top_layer_parameters,
        train_top_layers,
    )

    model = models(SMOL)
    L, k_train = model.num_layers, 4
    n_frozen = L - k_train
    text = Path(json.__file__).read_text()
    segs = [s for s in segment_text(text, 512) if len(s) > 400][: a.segments]
    scored = encode_texts(model, segs)
    out = []

    def plain_nll():
        res = torch.zeros(len(scored), scored.batch.input_ids.shape[1] - 1)
        for idx in length_batches(scored, 4):
            sub = scored.batch.select(idx)
            with torch.no_grad():
                logits = hf(model)(input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
            res[idx, : sub.input_ids.shape[1] - 1] = logits_nll(logits, sub.input_ids, sub.attention_mask[:, 1:])
        return res

    def naive_nll():
        res = torch.zeros(len(scored), scored.batch.input_ids.shape[1] - 1)
        for i in range(len(scored)):
            w = int(scored.batch.last[i])
            res[i, :w] = token_nll(model, scored.select([i]), 1)[0, :w]
        return res

    n_tok = int(scored.batch.attention_mask.sum())
    out.append(run_case(
        3, "scoring: token_nll", SMOL, f"{len(scored)} texts, {n_tok} tokens, batches of 4",
        "plain forward + the same loss", lambda: token_nll(model, scored, 4), plain_nll, naive_nll,
        repeats=a.repeats, agree=lambda o: (lambda d, dn: (f"naive {dn:.1e}, floor {d:.1e}", d < 1e-4 and dn < 1e-4))(
            maxdiff(o["library"], o["floor"]), maxdiff(o["library"], o["naive"]))))

    states = prefix_states(model, scored, n_frozen)
    out.append(run_case(
        3, "scoring on cached lower layers: cached_nll", SMOL, f"{len(scored)} texts, top {k_train} of {L} blocks",
        "plain full forward + the same loss (the floor without caching)",
        lambda: cached_nll(model, scored, states, n_frozen, 4), plain_nll,
        lambda: token_nll(model, scored, 4), repeats=a.repeats,
        agree=lambda o: _fmt_diff("full model", maxdiff(o["library"], o["naive"]), 1e-4)))

    params = top_layer_parameters(model, k_train)
    batches = shuffled_batches(len(scored), 4, 0, epochs=1)

    def lib_train():
        with restore_after(params):
            return torch.tensor(train_top_layers(model, scored, states, n_train_layers=k_train, lr=1e-4, epochs=1,
                                                 batch_size=4, seed=0, progress=False))

    def naive_train():
        # the same steps with every block run in every step (nothing cached)
        m = hf(model)
        losses = []
        with restore_after(params):
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
            with torch.enable_grad():
                for rows in batches:
                    sub = scored.batch.select(rows)
                    logits = m(input_ids=sub.input_ids, attention_mask=sub.attention_mask, use_cache=False).logits
                    nll = logits_nll(logits, sub.input_ids, sub.attention_mask[:, 1:])
                    loss = nll.sum() / sub.attention_mask[:, 1:].sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    losses.append(float(loss))
        return torch.tensor(losses)

    def floor_train():
        # the cached forward and backward of the same batches, without the optimiser
        losses = []
        with restore_after(params):
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad(), skip_lower_layers(model, n_frozen) as stub:
                for rows in batches:
                    sub = scored.batch.select(rows)
                    logits = _cached_forward(model, stub, _rows(states, rows), sub)
                    nll = logits_nll(logits, sub.input_ids, sub.attention_mask[:, 1:])
                    loss = nll.sum() / sub.attention_mask[:, 1:].sum()
                    loss.backward()
                    losses.append(float(loss))
        return torch.tensor(losses)

    out.append(run_case(
        3, "training the top blocks on cached states (1 epoch)", SMOL,
        f"{len(batches)} steps of 4 texts, top {k_train} of {L} blocks",
        "the same cached forward + backward, no optimiser", lib_train, floor_train, naive_train,
        repeats=a.repeats,
        agree=lambda o: (lambda d, d0: (f"losses vs full model {d:.1e} (first step {d0:.1e})", d < 1e-3))(
            maxdiff(o["library"], o["naive"]), maxdiff(o["library"][:1], o["floor"][:1]))))
    return out


# ---------------------------------------------------------------- chapter 4: activation addition


def _own_last_logprobs(model, sub, edit) -> torch.Tensor:
    """Lever: the final norm's output at each row's own last token, unembedded (``last_trace``), instead
    of logits at every row's last position for every row (``last_only``)."""
    from lmbook.mechanisms.readout import last_normed, last_trace, unembed

    with torch.no_grad(), last_trace(model, sub):
        edit(model)
        h = last_normed(model, sub)
    return unembed(model, h).log_softmax(-1)


def ch4(models: Models, a) -> list[Result]:
    import numpy as np

    from lmbook.core.tokens import Batch, encode, first_token_ids, text_ids
    from lmbook.experiments.steering import (
        _add_front,
        _check_configs,
        _plan,
        contrast_vector,
        steered_generate,
        steered_nll,
        steered_target_logprobs,
    )
    from lmbook.mechanisms.generation import generate_ids

    model = models(GEMMA)
    L = model.num_layers
    layers = sorted(set(np.linspace(0, L - 1, 6).round().astype(int).tolist()))
    sv = contrast_vector(model, " Love", " Hate", layers=layers)
    configs = [(None, 0.0)] + [(l, c) for l in layers for c in (1.0, 2.0, 4.0, 8.0, 16.0)]
    prompts = ["I think you are", "Today I feel", "The movie was", "My neighbour is", "The food at this restaurant is",
               "My day at work was", "Honestly, the book was", "When I see you, I feel"]
    words = json.loads((ROOT / "data/steering/word_lists.json").read_text())
    targets = torch.cat([first_token_ids(model, words["positive"]), first_token_ids(model, words["negative"])])
    B, C = len(prompts), len(configs)
    batch = encode(model, prompts, start=True)
    rep = batch.select([b for _ in range(C) for b in range(B)])
    out = []

    def lever():
        cfg = _check_configs(sv, configs)
        res = []
        for s in range(0, C * B, 256):
            rows = range(s, min(C * B, s + 256))
            sub = rep.select(list(rows))
            plan, n = _plan(sv, cfg, B, sub.input_ids.shape[1], rows)
            res.append(_own_last_logprobs(model, sub, lambda m: _add_front(m, plan, n))[:, targets])
        return torch.cat(res).reshape(C, B, -1)

    n_last = len(torch.unique(batch.last))
    out.append(run_case(
        4, "steering sweep: steered_target_logprobs", GEMMA,
        f"{C} configs x {B} prompts ({n_last} distinct last positions)",
        "plain forward of the same rows", lambda: steered_target_logprobs(model, prompts, sv, configs, targets),
        lambda: plain_last(model, rep),
        lambda: steered_target_logprobs(model, prompts, sv, configs, targets, max_rows=B),
        {"own-last readout": (lever, "logits at each row's own last token only (last_trace + unembed)")},
        repeats=a.repeats,
        agree=lambda o: (lambda d, dl: (f"naive {d:.1e}, lever {dl:.1e}", d < 1e-4 and dl < 1e-3))(
            maxdiff(o["library"], o["naive"]), maxdiff(o["library"], o["own-last readout"]))))

    neutral = [t for t in (ROOT / "data/steering/neutral_text.txt").read_text().splitlines() if t.strip()][:4]
    prefix = "Here is a short passage from a notebook of everyday facts."
    tok = model.tokenizer
    head = text_ids(tok, prefix, start=True)
    from lmbook.core.tokens import pad_ids

    nb = pad_ids(tok, neutral, [head + tok(" " + t, add_special_tokens=False)["input_ids"] for t in neutral])
    nrep = nb.select([b for _ in range(C) for b in range(len(neutral))])
    keep = torch.arange(len(head) - 1, nb.input_ids.shape[1] - 1)

    def plain_nll():
        from lmbook.mechanisms.readout import softcap

        res = []
        for s in range(0, len(nrep), max(1, 1024 // len(keep))):
            sub = nrep.select(list(range(s, min(len(nrep), s + max(1, 1024 // len(keep))))))
            k = keep[keep < sub.input_ids.shape[1] - 1]
            with torch.no_grad():
                lg = hf(model)(input_ids=sub.input_ids, attention_mask=sub.attention_mask, logits_to_keep=k).logits
            lp = softcap(model, lg.float()).log_softmax(-1)
            res.append(-(lp.gather(-1, sub.input_ids[:, k + 1, None])[..., 0] * sub.attention_mask[:, k + 1]).sum(-1))
        return torch.cat(res).reshape(C, len(neutral))

    out.append(run_case(
        4, "fluency: steered_nll", GEMMA, f"{C} configs x {len(neutral)} texts ({nb.input_ids.shape[1]} tokens)",
        "plain forward, logits at the same positions",
        lambda: steered_nll(model, neutral, sv, configs, prefix=prefix)[0], plain_nll,
        lambda: torch.cat([steered_nll(model, neutral, sv, [c], prefix=prefix)[0] for c in configs]),
        repeats=a.repeats,
        agree=lambda o: (lambda d, d0: (f"naive {d:.1e}, floor (unsteered row) {d0:.1e}", d < 1e-3 and d0 < 1e-3))(
            maxdiff(o["library"], o["naive"]), maxdiff(o["library"][0], o["floor"][0]))))

    gen_cfg = configs[: a.gen_rows]
    prompt = "I went up to my friend and said"
    ids = torch.tensor([text_ids(tok, prompt, start=True)] * len(gen_cfg))
    gb = Batch([prompt] * len(gen_cfg), ids, torch.ones_like(ids), torch.full((len(gen_cfg),), ids.shape[1] - 1), None)

    def naive_gen():
        return [steered_generate(model, prompt, sv, [c], max_new_tokens=a.new_tokens, sample=False)[0]
                for c in gen_cfg]

    out.append(run_case(
        4, "steered generation (greedy)", GEMMA, f"{len(gen_cfg)} configs x {a.new_tokens} tokens",
        "transformers generate of the same batch",
        lambda: steered_generate(model, prompt, sv, gen_cfg, max_new_tokens=a.new_tokens, sample=False),
        lambda: plain_generate(model, gb, a.new_tokens), naive_gen, repeats=a.repeats,
        agree=lambda o: (f"texts = naive: {sum(x == y for x, y in zip(o['library'], o['naive']))}/{len(gen_cfg)}",
                         o["library"] == o["naive"])))
    del generate_ids
    return out


# ---------------------------------------------------------------- chapter 5: refusal direction


def ch5(models: Models, a) -> list[Result]:
    from lmbook.core.tokens import left_padded
    from lmbook.data.instructions import load_instructions
    from lmbook.experiments.refusal import encode_prompts, format_instructions, generate, last_logprobs
    from lmbook.mechanisms.interventions import directional, directional_chunks

    model = models(SMOL)
    tok = model.tokenizer
    harmful = [r["instruction"] for r in load_instructions(ROOT / "data/instructions/harmful.jsonl")
               if r["split"] == "validation"][:8]
    val = encode_prompts(model, format_instructions(tok, harmful, "chat"), "chat")
    nh, n_cand = len(val), 8
    g = torch.Generator().manual_seed(0)
    cands = torch.randn(n_cand, model.hidden_size, generator=g)
    rep = val.select([b for _ in range(n_cand) for b in range(nh)])
    dirs = cands.repeat_interleave(nh, 0)
    out = []

    def lever():
        res = []
        for sub, ab, ad in directional_chunks(model, rep, dirs, None, 64):
            res.append(_own_last_logprobs(model, sub, lambda m: directional(m, ab, ad)))
        return torch.cat(res)

    n_last = len(torch.unique(val.last))
    out.append(run_case(
        5, "direction selection: last_logprobs, per-row ablation", SMOL,
        f"{n_cand} candidates x {nh} prompts ({n_last} distinct last positions)",
        "plain forward of the same rows", lambda: last_logprobs(model, rep, ablate=dirs, max_rows=64),
        lambda: plain_last(model, rep), lambda: last_logprobs(model, rep, ablate=dirs, max_rows=nh),
        {"own-last readout": (lever, "logits at each row's own last token only (last_trace + unembed)")},
        repeats=a.repeats,
        agree=lambda o: (lambda d, dl: (f"naive {d:.1e}, lever {dl:.1e}", d < 1e-4 and dl < 1e-3))(
            maxdiff(o["library"], o["naive"]), maxdiff(o["library"], o["own-last readout"]))))

    prompts = format_instructions(tok, harmful, "chat")
    d = cands[0]
    lb = left_padded(model, encode_prompts(model, prompts, "chat"))
    out.append(run_case(
        5, "generation with ablation at every step", SMOL, f"{len(prompts)} prompts x {a.new_tokens} tokens",
        "transformers generate of the same batch, no ablation",
        lambda: generate(model, prompts, "chat", ablate=d, max_new_tokens=a.new_tokens),
        lambda: plain_generate(model, lb, a.new_tokens),
        lambda: [generate(model, [p], "chat", ablate=d, max_new_tokens=a.new_tokens)[0] for p in prompts],
        repeats=a.repeats,
        agree=lambda o: (f"texts = naive: {sum(x == y for x, y in zip(o['library'], o['naive']))}/{len(prompts)}",
                         sum(x == y for x, y in zip(o["library"], o["naive"])) >= len(prompts) - 1)))
    return out


# ---------------------------------------------------------------- chapter 6: task vectors


def ch6(models: Models, a) -> list[Result]:
    from lmbook.core.tokens import answer_token_ids, encode, left_padded
    from lmbook.data.tasks import shuffled_few_shot_prompts, task_vector_prompts, zero_shot_prompt
    from lmbook.experiments.taskvectors import head_patch_effects, task_vectors
    from lmbook.mechanisms.generation import greedy_tokens
    from lmbook.mechanisms.interventions import intervene_sweep, replicate
    from lmbook.mechanisms.sublayers import head_contributions

    model = models(GEMMA)
    L, H = model.num_layers, model.num_heads
    split = task_split("antonyms", 15, 25)
    val_q = [x for x, _ in split.val][: a.prompts]
    _, dummy = task_vector_prompts(split.demos, val_q, 5, 2, seed=0)
    tv = task_vectors(model, encode(model, dummy), group=2)  # [L, V, d]
    zs = encode(model, [zero_shot_prompt(q) for q in val_q])
    tg = answer_token_ids(model, [y for _, y in split.val][: a.prompts])
    out = []

    def agree_sweep(o):
        d = maxdiff(o["library"].target_logprob, o["naive"].target_logprob)
        same = bool((o["library"].top1 == o["naive"].top1).all())
        dp = maxdiff(o["floor"], o["cached prefix floor"])
        return f"naive {d:.1e}, top-1 same {same}; prefix-floor vs floor {dp:.1e}", d < 1e-4 and same and dp < 1e-3

    out.append(run_case(
        6, "task-vector layer sweep: intervene_sweep", GEMMA, f"{len(zs)} zero-shot prompts x {L} layers",
        "plain forward of the L copies",
        lambda: intervene_sweep(model, zs, tv, list(range(L)), targets=tg), lambda: plain_last(model, replicate(zs, L)),
        lambda: intervene_sweep(model, zs, tv, list(range(L)), targets=tg, max_rows=len(zs)),
        {"cached prefix floor": (lambda: prefix_floor(model, zs, L),
                                 "floor of feeding only the last token of every copy against the prompts' cache")},
        repeats=a.repeats, agree=agree_sweep))

    pool = list(split.demos)
    clean = encode(model, [p for p in shuffled_few_shot_prompts(pool, [x for x, _ in pool[:4]], 5, seed=2)])
    layers = list(range(a.head_layers))
    mean_z = head_contributions(model, clean, layers)["z"].mean(1)
    cor_pairs = pool[4:4 + a.corrupted]
    cor = encode(model, shuffled_few_shot_prompts(pool, [x for x, _ in cor_pairs], 5, seed=3))
    cor_tg = answer_token_ids(model, [y for _, y in cor_pairs])
    units = len(layers) * H

    def agree_heads(o):
        d = maxdiff(o["library"], o["naive"])
        dp = maxdiff(o["floor"], o["cached prefix floor"])
        return f"naive {d:.1e}; prefix-floor vs floor {dp:.1e}", d < 1e-5 and dp < 1e-3

    out.append(run_case(
        6, "function-vector head patch effects", GEMMA,
        f"{len(cor)} prompts ({cor.input_ids.shape[1]} tokens) x {units} heads ({len(layers)} layers)",
        "plain forward of the copies",
        lambda: head_patch_effects(model, cor, mean_z, cor_tg, layers=layers),
        lambda: plain_last(model, replicate(cor, units)),
        lambda: head_patch_effects(model, cor, mean_z, cor_tg, layers=layers, max_rows=len(cor)),
        {"cached prefix floor": (lambda: prefix_floor(model, cor, units),
                                 "floor of feeding only the last token of every copy against the prompts' cache")},
        repeats=a.repeats, agree=agree_heads))

    test_q = [x for x, _ in split.test][: a.prompts // 2]
    T = len(test_q)
    both = encode(model, [zero_shot_prompt(q) for q in test_q] * 2)
    layer, n_tok = L // 2, 4
    vec = tv[layer, :T]

    def naive_greedy():
        res = []
        for i in range(2 * T):
            one = both.select([i])
            if i < T:
                res += greedy_tokens(model, one, n_tok)
            else:
                res += greedy_tokens(model, one, n_tok, layer=layer, vectors=vec[i - T])
        return res

    out.append(run_case(
        6, "greedy decoding with a patched task vector", GEMMA, f"{2 * T} prompts x {n_tok} tokens",
        "transformers generate of the same batch",
        lambda: greedy_tokens(model, both, n_tok, layer=layer, vectors=vec, patch_rows=range(T, 2 * T)),
        lambda: plain_generate(model, left_padded(model, both), n_tok), naive_greedy, repeats=a.repeats,
        agree=lambda o: (f"ids = naive: {sum(x == y for x, y in zip(o['library'], o['naive']))}/{2 * T}",
                         o["library"] == o["naive"])))
    return out


# ---------------------------------------------------------------- chapter 7: vector arithmetic


def ch7(models: Models, a) -> list[Result]:
    from lmbook.core.tokens import encode
    from lmbook.experiments.arithmetic import one_shot_prompt
    from lmbook.mechanisms.interventions import intervene_sweep, replicate
    from lmbook.mechanisms.sublayers import sublayer_writes

    model = models(GEMMA)
    L = model.num_layers
    pairs = list(task_split("country_capital", 1, 1).demos)
    q = "What is the capital of {}?"
    items = pairs[1: 1 + a.items]
    batch = encode(model, [one_shot_prompt(q, pairs[0], x) for x, _ in items])
    out = []

    def agree_writes(o):
        w, hs = o["library"], o["naive"]
        d = max(maxdiff(w["resid"][l], hs[l][torch.arange(len(batch)), batch.last]) for l in range(L))
        return f"resid vs plain hooks {d:.1e}", d < 1e-3

    out.append(run_case(
        7, "sublayer_writes (every layer, last token)", GEMMA, f"{len(batch)} one-shot prompts x {L} layers",
        "plain forward, logits at one position",
        lambda: sublayer_writes(model, batch),
        lambda: hf(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1),
        lambda: plain_layer_outputs(model, batch), repeats=a.repeats, agree=agree_writes))

    sw = batch.select(list(range(a.sweep)))
    w = sublayer_writes(model, sw)
    own = w["mlp"]  # [L, n, d]
    vl = own.mean(1)
    vecs = torch.cat([-own, vl[:, None] - own])
    lay = list(range(L)) * 2

    def agree_sweep(o):
        same = bool((o["library"].top1 == o["naive"].top1).all())
        dp = maxdiff(o["floor"], o["cached prefix floor"])
        return f"top-1 = naive {same}; prefix-floor vs floor {dp:.1e}", same and dp < 1e-3

    out.append(run_case(
        7, "relation edits sweep: intervene_sweep (remove, swap)", GEMMA,
        f"{len(sw)} prompts ({sw.input_ids.shape[1]} tokens) x {2 * L} edits", "plain forward of the copies",
        lambda: intervene_sweep(model, sw, vecs, lay, mode="add"),
        lambda: plain_last(model, replicate(sw, 2 * L)),
        lambda: intervene_sweep(model, sw, vecs, lay, mode="add", max_rows=len(sw)),
        {"cached prefix floor": (lambda: prefix_floor(model, sw, 2 * L),
                                 "floor of feeding only the last token of every copy against the prompts' cache")},
        repeats=a.repeats, agree=agree_sweep))
    return out


CHAPTERS = {1: ch1, 2: ch2, 3: ch3, 4: ch4, 5: ch5, 6: ch6, 7: ch7}


# ---------------------------------------------------------------- reporting


def _r(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def print_result(r: Result) -> None:
    t = r.times
    line = (f"ch{r.chapter} {r.case} [{r.model}; {r.size}]\n"
            f"    library {t['library']:.3f} s | floor {t['floor']:.3f} s ({r.floor})"
            + (f" | naive {t['naive']:.3f} s" if "naive" in t else "")
            + f"\n    library/floor {_r(r.ratio('library', 'floor'))}x"
            + (f" | naive/library {_r(r.ratio('naive', 'library'), '{:.1f}')}x" if "naive" in t else ""))
    for name in r.levers:
        line += f" | {name} {t[name]:.3f} s ({_r(r.ratio(name, 'library'))}x library)"
    line += f"\n    agreement: {r.agreement} -> {'ok' if r.ok else 'MISMATCH'}"
    print(line, flush=True)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def table(rows: list[dict]) -> str:
    head = ("| ch | case | model | size | library s | floor s | naive s | library/floor | naive/library "
            "| lever (x library) | agreement |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in sorted(rows, key=lambda r: r["chapter"]):
        t = r["times"]
        lev = "; ".join(f"{k}: {t[k] / t['library']:.2f}x" for k in r.get("levers", {}))
        lines.append(
            f"| {r['chapter']} | {r['case']} | {r['model']} | {r['size']} | {t['library']:.2f} | {t['floor']:.2f} "
            f"| {_r(t.get('naive'))} | **{t['library'] / t['floor']:.2f}** "
            f"| {_r(t['naive'] / t['library'] if 'naive' in t else None, '{:.1f}')} | {lev or '–'} "
            f"| {r['agreement']}{'' if r['ok'] else ' **MISMATCH**'} |")
    return head + "\n".join(lines) + "\n"


def write(results: list[Result], meta: dict) -> None:
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    done = {(r.chapter, r.case) for r in results}
    rows = [r for r in old.get("rows", []) if (r["chapter"], r["case"]) not in done]
    rows += [dataclasses.asdict(r) | {"measured": meta["date"]} for r in results]
    rows.sort(key=lambda r: r["chapter"])
    runs = [m for m in old.get("runs", []) if m.get("chapters") != meta["chapters"]][-5:] + [meta]
    RESULTS.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1) + "\n")
    if README.exists():
        text = README.read_text()
        if BEGIN in text and END in text:
            m = meta
            info = (f"Measured {m['date']} with `{m['command']}` on {m['machine']['cpu']} "
                    f"({m['machine']['cores']} cores), torch {m['machine']['torch']}, "
                    f"{m['threads']} torch thread(s), best of {m['repeats']}; load average before / after: "
                    f"{m['load_before']} / {m['load_after']}. Rows from earlier runs keep their own date "
                    "in `bench/results.json`.\n\n")
            text = text.split(BEGIN)[0] + BEGIN + "\n" + info + table(rows) + END + text.split(END, 1)[1]
            README.write_text(text)
    print(f"wrote {RESULTS.relative_to(ROOT)} and the table of {README.relative_to(ROOT)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chapter", type=int, action="append", choices=sorted(CHAPTERS), help="chapter (repeatable)")
    p.add_argument("--all", action="store_true", help="every chapter")
    p.add_argument("--case", default=None, help="only cases whose name contains this text")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats, best kept (naive runs once)")
    p.add_argument("--facts", type=int, default=2, help="facts in the knockout sweep")
    p.add_argument("--trace-positions", type=int, default=2, help="positions restored in causal tracing (1-4)")
    p.add_argument("--noise-samples", type=int, default=1)
    p.add_argument("--segments", type=int, default=8, help="texts scored and trained on (chapter 3)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated (chapters 4, 5)")
    p.add_argument("--gen-rows", type=int, default=8, help="steering configurations generated (chapter 4)")
    p.add_argument("--prompts", type=int, default=12, help="zero-shot prompts (chapter 6)")
    p.add_argument("--corrupted", type=int, default=4, help="shuffled-label prompts (chapter 6)")
    p.add_argument("--head-layers", type=int, default=4, help="layers whose heads are patched (chapter 6)")
    p.add_argument("--items", type=int, default=16, help="one-shot prompts read (chapter 7)")
    p.add_argument("--sweep", type=int, default=4, help="prompts in the relation-edit sweep (chapter 7)")
    p.add_argument("--write", action="store_true", help="merge into bench/results.json and rewrite the README table")
    a = p.parse_args(argv)
    chapters = sorted(CHAPTERS) if a.all else sorted(set(a.chapter or []))
    if not chapters:
        p.error("give --all or at least one --chapter")
    global CASE_FILTER
    CASE_FILTER = a.case
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    os.chdir(ROOT)
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "chapters": chapters,
            "command": "python bench/suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "threads": torch.get_num_threads(), "repeats": a.repeats,
            "load_before": loadavg()}
    print(f"torch threads {torch.get_num_threads()}, load average {meta['load_before']}", flush=True)
    models, results = Models(), []
    t0 = time.perf_counter()
    for ch in chapters:
        print(f"== chapter {ch}", flush=True)
        for r in CHAPTERS[ch](models, a):
            if r is None:
                continue
            print_result(r)
            results.append(r)
    meta["load_after"] = loadavg()
    meta["model_load_s"] = models.load_s
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {meta['total_s']} s (model loads {sum(models.load_s.values()):.1f} s), "
          f"load average after {meta['load_after']}")
    bad = [r for r in results if not r.ok]
    if a.write:
        write(results, meta)
    for r in bad:
        print(f"MISMATCH: ch{r.chapter} {r.case}: {r.agreement}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
