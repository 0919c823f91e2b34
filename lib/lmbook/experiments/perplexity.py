"""Perplexity and what it hides, after Öncel et al. (2024): bits per byte, which tokens carry the
loss, and what continued pretraining on a domain does to perplexity and to knowledge.

The protocol of chapter 3 ("Perplexity pitfalls"). The mechanisms it stands on live elsewhere:
scoring texts token by token in :mod:`lmbook.mechanisms.likelihood` (:func:`encode_texts`,
:func:`token_nll`), training the top blocks on cached lower-layer states in
:mod:`lmbook.mechanisms.training`. This module adds

* the measures: perplexity per token = ``exp(total nats / number of tokens)`` (depends on the
  tokenizer) and bits per byte = ``total nats / ln 2 / number of UTF-8 bytes`` (comparable across
  tokenizers), :func:`summarize`; token classes and loss shares (:func:`token_class`,
  :func:`token_table`, :func:`class_shares`, :func:`top_token_shares`);
* :func:`adapt`: one continued-pretraining run scored on every test domain after each pass;
* the chapter's sections as protocol functions returning small dataclasses, each with a
  ``records()`` dict of what the chapter records: :func:`score_models` and :func:`tokenizer_gap`
  (section 1), :func:`loss_concentration` (section 2), :func:`adaptation_baseline`,
  :func:`adaptation_sweep` and :func:`change_drivers` (section 3), :func:`recall_changes`
  (section 4);
* for the chapter's claims (:mod:`lmbook.core.claims`): :func:`run_directions` (whether each run's
  same-domain loss rose or fell beyond its interval) and :meth:`RecallChanges.correlation` (the rank
  correlation of perplexity and recall changes with a bootstrap interval over runs).
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lmbook.core.claims import Estimate, compare
from lmbook.core.params import ParameterError, check_dtype, check_float, check_int
from lmbook.core.stats import bootstrap_ci, cluster_ratio_bootstrap
from lmbook.core.tokens import Batch, encode
from lmbook.core.tokens import _tokenizer as _tok
from lmbook.data.facts import Fact, answer_token_ids
from lmbook.mechanisms.likelihood import Scored, encode_texts, token_nll
from lmbook.mechanisms.readout import top1_matches
from lmbook.mechanisms.training import (
    cached_last_top1,
    cached_nll,
    prefix_states,
    restore_after,
    top_layer_parameters,
    train_top_layers,
)

__all__ = ["LN2", "summarize", "CLASSES", "WHITESPACE", "token_class", "token_texts", "token_table", "class_shares",
           "top_token_shares", "ppl_excluding", "readable_tokens", "evenly_spaced", "AdaptResult", "adapt",
           "bpb_change", "direction", "ModelScores", "score_precision", "score_models", "TokenizerGap", "tokenizer_gap",
           "LossConcentration", "loss_concentration", "Baseline", "adaptation_baseline", "AdaptationRun", "Sweep",
           "adaptation_sweep", "DepthComparison", "depth_comparison", "Similarity", "unigram_js", "similarity",
           "ChangeDrivers", "change_drivers", "RecallChanges", "recall_changes", "run_directions"]

LN2 = math.log(2.0)
WHITESPACE = ["newline", "space"]
"""The token classes that are whitespace (see :data:`CLASSES`)."""


# --------------------------------------------------------------------------------------------------
# Bits per byte


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


def readable_tokens(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with each token text shown as its ``repr``, so whitespace is visible."""
    return table.assign(text=table["text"].map(repr))


def evenly_spaced(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is 0 or not smaller)."""
    check_int("n", n, 0)
    items = list(items)
    if not n or n >= len(items):
        return items
    return [items[round(i * len(items) / n)] for i in range(n)]


# --------------------------------------------------------------------------------------------------
# One continued-pretraining run


@dataclasses.dataclass
class AdaptResult:
    """What :func:`adapt` measured. ``eval_steps``: steps at which the eval sets were scored;
    ``eval_segments[name]``: the nats of each segment of eval set ``name`` at each of those steps
    (``[B]`` arrays); ``final_nll[name]``: ``[B, T-1]`` per-token losses of each ``finals`` set after
    the last step; ``train_loss``: mean loss of each training batch; ``steps_per_epoch``."""

    eval_steps: list[int]
    eval_segments: dict[str, list[np.ndarray]]
    final_nll: dict[str, torch.Tensor]
    train_loss: list[float]
    steps_per_epoch: int

    @property
    def eval_nats(self) -> dict[str, list[float]]:
        """Total nats of each eval set at each of ``eval_steps``."""
        return {k: [float(v.sum()) for v in vs] for k, vs in self.eval_segments.items()}


def _segment_nats(nll: torch.Tensor, scored: Scored) -> np.ndarray:
    return (nll * scored.target_mask).sum(1).double().numpy()


def adapt(model, train: Scored, train_states, evals: dict, *, n_train_layers: int, lr: float, epochs: int = 1,
          batch_size: int = 8, eval_steps: Sequence[int] = (), finals: dict | None = None, seed: int = 0,
          max_grad_norm: float = 1.0, warmup: int = 0, schedule: str = "constant", bf16: bool = False,
          initial: dict | None = None, desc: str = "training") -> AdaptResult:
    """Continue pretraining the top ``n_train_layers`` blocks (and the final norm) on ``train``
    (:func:`lmbook.mechanisms.training.train_top_layers`: ``epochs`` passes, ``warmup`` steps of
    linear warm-up then a ``schedule``, ``bf16`` mixed precision) and score eval sets along the way.

    ``train_states`` and the states in ``evals`` and ``finals`` (``{name: (scored, states)}``) come
    from :func:`lmbook.mechanisms.training.prefix_states` with ``n_frozen = model.num_layers -
    n_train_layers``. The ``evals`` (small, for the learning curve) are scored at step 0, at
    ``eval_steps`` and after the last step; the ``finals`` (whole test sets) once, after the last
    step. Scoring is in float32. The weights are changed in place: wrap the call in
    :func:`lmbook.mechanisms.training.restore_after`. ``initial`` (``{name: per-segment nats}`` of
    the base model) spares scoring the eval sets at step 0.
    """
    check_int("epochs", epochs, 0)
    n_frozen = model.num_layers - n_train_layers
    per_epoch = math.ceil(len(train) / batch_size)
    total = per_epoch * epochs
    marks = sorted({0, total} | {int(m) for m in eval_steps if 0 <= int(m) <= total})
    res = AdaptResult(marks, {k: [] for k in evals}, {}, [], per_epoch)

    def evaluate(step):
        if step not in marks:
            return
        for name, (sc, st) in evals.items():
            res.eval_segments[name].append(_segment_nats(cached_nll(model, sc, st, n_frozen), sc))

    if initial is not None:
        for name in evals:
            res.eval_segments[name].append(np.asarray(initial[name], dtype=float))
    else:
        evaluate(0)
    if total:
        res.train_loss = train_top_layers(model, train, train_states, n_train_layers=n_train_layers, lr=lr,
                                          epochs=epochs, batch_size=batch_size, seed=seed,
                                          max_grad_norm=max_grad_norm, on_step=evaluate, desc=desc, warmup=warmup,
                                          schedule=schedule, bf16=bf16)
    for name, (sc, st) in (finals or {}).items():
        res.final_nll[name] = cached_nll(model, sc, st, n_frozen)
    return res


def bpb_change(delta_nats, nbytes, documents, seed: int = 0) -> Estimate:
    """A change in bits per byte of a test set, ``sum(delta_nats) / ln 2 / sum(nbytes)`` over its
    segments (``delta_nats``: ``[B]`` or ``[C, B]``), with the 95% interval from resampling its
    **documents** (``documents``: the document of each segment; :func:`lmbook.core.stats.cluster_ratio_bootstrap`).
    An :class:`lmbook.core.claims.Estimate` (or a list of them for ``[C, B]``)."""
    v, lo, hi = cluster_ratio_bootstrap(np.asarray(delta_nats, dtype=float) / LN2, np.asarray(nbytes, dtype=float),
                                        list(documents), seed=seed)
    if np.ndim(v) == 0:
        return Estimate(float(v), float(lo), float(hi))
    return [Estimate(float(a), float(b), float(c)) for a, b, c in zip(v, lo, hi)]


def direction(e: Estimate) -> str:
    """``"rise"`` / ``"fall"`` when the interval of a change lies wholly above / below 0, else ``"unclear"``."""
    return {"greater": "rise", "less": "fall"}.get(compare(e, 0), "unclear")


# --------------------------------------------------------------------------------------------------
# Section 1: every model on every domain, and what the tokenizer does to perplexity


@dataclasses.dataclass
class ModelScores:
    """Section 1 of chapter 3. ``table``: one row per (model, domain) with :func:`summarize`'s
    columns; ``tokens[model, domain]``: its :func:`token_table`. For the trained model ``main``:
    ``tests[domain]`` (the encoded test segments), ``nll[domain]`` (``[B, T-1]`` per-token losses)
    and ``states[domain]`` (the output of its lower ``n_frozen`` blocks, ``None`` when 0).
    ``dtype``: the parameters' dtype of the models that are only scored; ``precision``: what that
    dtype changed (:func:`score_precision`), ``None`` when not measured."""

    main: str
    models: list[str]
    domains: list[str]
    n_frozen: int
    table: pd.DataFrame
    tokens: dict[tuple[str, str], pd.DataFrame]
    tests: dict[str, Scored]
    nll: dict[str, torch.Tensor]
    states: dict[str, torch.Tensor | None]
    sources: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # the document of each test segment
    dtype: str = "float32"
    precision: dict | None = None

    def records(self) -> dict:
        return {"scores": self.table.to_dict(orient="records"), "n_scored_models": len(self.models),
                "score_dtype": self.dtype, "score_precision": self.precision}


def score_precision(fast: torch.Tensor, exact: torch.Tensor, scored: Scored, sources: Sequence[str],
                    idx: Sequence[int], seed: int = 0) -> dict:
    """How much scoring a test set in a lower precision changes its bits per byte. ``fast``: the
    per-token losses ``[B, T-1]`` of every segment of ``scored`` from the lower-precision model;
    ``exact``: those of the segments ``idx`` (``[len(idx), T'-1]``) from the same model in float32;
    ``sources``: the document of each segment. Returns ``bpb_fast`` / ``bpb_exact`` on those
    segments, ``difference`` (fast minus exact, bits per byte, with its 95% interval over their
    documents), ``bpb`` (the whole test set's bits per byte in the lower precision with its 95%
    interval over documents: the uncertainty the difference is set against) and ``half_width``
    (of that interval), ``n_segments`` and ``n_documents`` compared."""
    idx = list(idx)
    sub = scored.select(idx)
    if exact.shape[0] != len(idx) or not idx:
        raise ParameterError(f"exact has {exact.shape[0]} rows for {len(idx)} segments")
    mask = sub.target_mask
    w = min(exact.shape[1], mask.shape[1])
    seg_exact = (exact[:, :w] * mask[:, :w]).sum(1).numpy().astype(float)
    seg_fast_all = (fast * scored.target_mask).sum(1).numpy().astype(float)
    seg_fast = seg_fast_all[idx]
    nb = sub.nbytes.numpy().astype(float)
    docs = [sources[i] for i in idx]
    diff = bpb_change(seg_fast - seg_exact, nb, docs, seed=seed)
    v, lo, hi = cluster_ratio_bootstrap(seg_fast_all / LN2, scored.nbytes.numpy().astype(float), list(sources),
                                        seed=seed)
    bpb = Estimate(float(v), float(lo), float(hi))
    return {"n_segments": len(idx), "n_documents": len(set(docs)),
            "bpb_exact": float(seg_exact.sum() / LN2 / nb.sum()), "bpb_fast": float(seg_fast.sum() / LN2 / nb.sum()),
            "difference": diff.to_json(), "bpb": bpb.to_json(), "half_width": (bpb.high - bpb.low) / 2}


def score_models(model, main: str, models: Sequence[str], corpora, *, n_frozen: int, device: str = "auto",
                 batch_size: int = 4, dtype: str = "float32", precision_segments: int = 0,
                 seed: int = 0) -> ModelScores:
    """Score the test segments of every corpus with every model in ``models`` (``main`` is the
    loaded ``model``, scored as loaded: every training change of section 3 is measured from its
    scores; the others are loaded here, one at a time, with ``dtype`` parameters and without
    attention probabilities, since they are only scored). For ``main`` the same traces also keep
    the output of its lower ``n_frozen`` blocks, which section 3 trains on top of.

    With ``precision_segments > 0`` and ``dtype`` other than float32, the first model other than
    ``main`` also scores that many segments, spread evenly over the first corpus's test set, in
    float32 (a second load of it), and :func:`score_precision` compares the two (``precision``)."""
    from lmbook.core.models import load_model

    check_int("n_frozen", n_frozen, 0, model.num_layers - 1)
    check_dtype("dtype", dtype)
    check_int("precision_segments", precision_segments, 0)
    rows, tables, tests, nlls, states = [], {}, {}, {}, {}
    sources = {c.name: list(c.test_sources) or [f"segment {i}" for i in range(len(c.test))] for c in corpora}
    precision, check = None, precision_segments > 0 and dtype != "float32"
    for name in models:
        m = model if name == main else load_model(name, device=device, dtype=getattr(torch, dtype),
                                                  attention_probs=False)
        for c in corpora:
            sc = encode_texts(m, c.test)
            if name == main and n_frozen:
                nll, st = token_nll(m, sc, batch_size, states_after=n_frozen - 1)
            else:
                nll, st = token_nll(m, sc, batch_size), None
            rows.append({"model": name, "domain": c.name, **summarize(nll, sc)})
            tables[name, c.name] = token_table(m, sc, nll, model=name, domain=c.name)
            if name == main:
                tests[c.name], nlls[c.name], states[c.name] = sc, nll, st
            elif c is corpora[0]:
                first = sc, nll
        remote = getattr(m, "lmbook_remote", False)
        del m  # one model loaded besides ``model`` at a time
        if name != main and check and precision is None and not remote:  # the same segments in float32
            sc, nll = first
            idx = evenly_spaced(range(len(sc)), precision_segments)
            exact_model = load_model(name, device=device, dtype=torch.float32, attention_probs=False)
            exact = token_nll(exact_model, sc.select(idx), batch_size)
            del exact_model
            precision = {"model": name, "domain": corpora[0].name, "dtype": dtype,
                         **score_precision(nll, exact, sc, sources[corpora[0].name], idx, seed=seed)}
    return ModelScores(main, list(models), [c.name for c in corpora], n_frozen, pd.DataFrame(rows), tables,
                       tests, nlls, states, sources, dtype, precision)


@dataclasses.dataclass
class TokenizerGap:
    """Per domain (``table``): which model is best by perplexity and by bits per byte, and the gap
    in log2 perplexity between the main model and the other split into a quality term and a
    tokenizer term (``log2 ppl = bits per byte x bytes per token``)."""

    table: pd.DataFrame
    rank_flips: int
    bytes_per_token_max_ratio: float
    tokenizer_term_share_max: float
    tokenizer_term_domain: str

    def records(self) -> dict:
        return {k: getattr(self, k) for k in ["rank_flips", "bytes_per_token_max_ratio", "tokenizer_term_share_max",
                                              "tokenizer_term_domain"]}


def tokenizer_gap(scores: ModelScores) -> TokenizerGap:
    """Split each domain's perplexity gap between ``scores.main`` and the next scored model into what
    the models predict (bits per byte) and how their tokenizers cut the text (bytes per token)."""
    t, flips = scores.table, []
    for d in scores.domains:
        s = t[t.domain == d].set_index("model")
        by_ppl, by_bpb = list(s["ppl"].sort_values().index), list(s["bits_per_byte"].sort_values().index)
        row = {"domain": d, "best by perplexity": by_ppl[0], "best by bits per byte": by_bpb[0],
               "ranking flips": by_ppl != by_bpb}
        if len(scores.models) > 1:
            a, b = s.loc[scores.main], s.loc[scores.models[1]]
            row[f"log2 ppl gap vs {scores.models[1]}"] = math.log2(a.ppl) - math.log2(b.ppl)
            row["quality term"] = (a.bits_per_byte - b.bits_per_byte) * a.bytes_per_token
            row["tokenizer term"] = b.bits_per_byte * (a.bytes_per_token - b.bytes_per_token)
        flips.append(row)
    table = pd.DataFrame(flips)
    bpt = t.groupby("model")["bytes_per_token"].mean()
    share_max, domain = 0.0, "none"  # one model: no gap to split
    if len(scores.models) > 1:
        share = (table["tokenizer term"] / table["quality term"]).abs()
        share_max, domain = float(share.max()), str(table.loc[share.idxmax(), "domain"])
    return TokenizerGap(table, int(table["ranking flips"].sum()), float(bpt.max() / bpt.min()), share_max, domain)


# --------------------------------------------------------------------------------------------------
# Section 2: which tokens carry the loss


@dataclasses.dataclass
class LossConcentration:
    """Section 2 of chapter 3. ``shares``: :func:`class_shares` per model and domain; ``table``: per
    model and domain, the loss and token shares of the ``top_k`` token types and of whitespace, and
    perplexity with whitespace (and punctuation) left out; ``cumulative[model, domain]``: cumulative
    loss share over token types by rank; ``top_types``: the main model's costliest token types per
    domain."""

    main: str
    top_k: int
    shares: pd.DataFrame
    table: pd.DataFrame
    cumulative: dict[tuple[str, str], np.ndarray]
    top_types: pd.DataFrame

    def records(self) -> dict:
        main = self.table[self.table.model == self.main].set_index("domain")
        top_loss, top_tokens = f"loss share of top {self.top_k} types", f"token share of top {self.top_k} types"
        ws = main["loss share of whitespace"]
        ratio = main["ppl without whitespace and punctuation"] / main["ppl"]
        return {"token_shares": self.table.to_dict(orient="records"), "top_k": self.top_k,
                "topk_loss_share_max": float(main[top_loss].max()), "topk_loss_share_min": float(main[top_loss].min()),
                "ws_loss_share_max": float(ws.max()), "ws_loss_share_domain": str(ws.idxmax()),
                "ws_token_share_at_max": float(main.loc[ws.idxmax(), "token share of whitespace"]),
                "topk_token_share_min": float(main[top_tokens].min()),
                "topk_token_share_max": float(main[top_tokens].max()),
                "ppl_ratio_no_ws_punct_max": float(ratio.max()), "ppl_ratio_domain": str(ratio.idxmax())}


def loss_concentration(scores: ModelScores, top_k: int = 10, n_types: int = 5) -> LossConcentration:
    """How the loss of each model on each domain splits over token classes and token types."""
    check_int("top_k", top_k, 1)
    shares = class_shares(pd.concat(scores.tokens.values(), ignore_index=True), by=["model", "domain"])
    rows, cum = [], {}
    for (name, d), t in scores.tokens.items():
        top = top_token_shares(t, k=top_k)
        cum[name, d] = top["cumulative"]
        ws = t["cls"].isin(WHITESPACE)
        rows.append({"model": name, "domain": d, "token types": top["types"],
                     f"loss share of top {top_k} types": top["loss_share"],
                     f"token share of top {top_k} types": top["token_share"],
                     "loss share of whitespace": t.loc[ws, "nll"].sum() / t["nll"].sum(),
                     "token share of whitespace": ws.mean(), "ppl": math.exp(t["nll"].mean()),
                     "ppl without whitespace": ppl_excluding(t, WHITESPACE),
                     "ppl without whitespace and punctuation": ppl_excluding(t, WHITESPACE + ["punctuation"])})
    top_types = []
    for d in scores.domains:
        t = scores.tokens[scores.main, d]
        g = t.groupby("text")["nll"].agg(count="size", total="sum", mean="mean").sort_values("total", ascending=False)
        g["loss share"] = g["total"] / t["nll"].sum()
        top_types.append(g.head(n_types).reset_index().assign(domain=d))
    return LossConcentration(scores.main, top_k, shares, pd.DataFrame(rows), cum,
                             pd.concat(top_types, ignore_index=True))


# --------------------------------------------------------------------------------------------------
# Section 3: continued pretraining, one pass over fresh text per domain


@dataclasses.dataclass
class Baseline:
    """Section 3's starting point: the base model's test losses (``nll``, the full model's;
    ``cache_error`` is the largest difference of the cached path from them), per-segment nats
    (``segment_nats``), bytes and tokens per test domain, the document of each test segment
    (``sources``), the fixed subset of test segments scored along each run (``curve_idx``), and the
    facts with the base model's top-1 answers (``known``)."""

    n_frozen: int
    tests: dict[str, Scored]
    states: dict[str, torch.Tensor | None]
    nll: dict[str, torch.Tensor]
    initial: dict[str, float]
    nbytes: dict[str, int]
    ntokens: dict[str, int]
    cache_error: float
    facts: list[Fact]
    fact_batch: Batch
    fact_states: torch.Tensor | None
    answers: torch.Tensor
    known: torch.Tensor
    sources: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    segment_nats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    curve_idx: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def bits_per_byte(self, domain: str, nats: float | None = None) -> float:
        """Bits per byte of ``domain``'s test set for total ``nats`` (default: the base model's)."""
        return (self.initial[domain] if nats is None else nats) / LN2 / self.nbytes[domain]

    def curve_set(self, domain: str) -> tuple[Scored, torch.Tensor | None]:
        """The fixed subset of ``domain``'s test segments that the learning curves score, with its states."""
        idx = self.curve_idx[domain]
        st = self.states[domain]
        return self.tests[domain].select(idx), (None if st is None else st[idx])


def adaptation_baseline(model, scores: ModelScores, facts: Sequence[Fact], tol: float = 1e-3,
                        curve_chars: int = 4096) -> Baseline:
    """Check the cached lower blocks against the full model (the test losses of section 1 on the curve
    subsets, and the top-1 answer to every fact) and collect what every run of
    :func:`adaptation_sweep` starts from (the full model's test losses).
    A fact is *known* as in chapter 2 (:func:`lmbook.experiments.recall.known_mask`): the model's
    top-1 next token after its prompt is the attribute's first token. The learning curves score a
    fixed subset of each test set: test segments spread evenly over it, about ``curve_chars``
    characters."""
    check_int("curve_chars", curve_chars, 1)
    n_frozen, domains = scores.n_frozen, scores.domains
    tests, states = scores.tests, scores.states
    curve_idx = {}
    for d in domains:
        lengths = [len(t) for t in tests[d].texts]
        n = max(1, min(len(lengths), round(curve_chars / (sum(lengths) / len(lengths)))))
        curve_idx[d] = evenly_spaced(list(range(len(lengths))), n)
    nll = scores.nll  # the full model's: every change is measured from it
    error = 0.0  # the cached path against the full model, on the curve subsets (the same code path as every run)
    for d in domains:
        idx = curve_idx[d]
        cached = cached_nll(model, tests[d].select(idx), None if states[d] is None else states[d][idx], n_frozen)
        error = max(error, float((cached - nll[d][idx][:, : cached.shape[1]]).abs().max()))
    if not error < tol:
        raise RuntimeError(f"cached lower layers disagree with the full model by {error} (tolerance {tol})")
    facts = list(facts)
    fact_batch = encode(model, [f.prompt for f in facts])
    answers = answer_token_ids(model, facts)
    known = top1_matches(model, [f.prompt for f in facts], answers)
    fact_states = prefix_states(model, fact_batch, n_frozen, batch_size=64)
    if not torch.equal(cached_last_top1(model, fact_batch, fact_states, n_frozen) == answers, known):
        raise RuntimeError("cached lower layers and the full model disagree on which facts are known")
    return Baseline(n_frozen, tests, states, nll, {d: float((nll[d] * tests[d].target_mask).sum()) for d in domains},
                    {d: int(tests[d].nbytes.sum()) for d in domains},
                    {d: int(tests[d].target_mask.sum()) for d in domains}, error, facts, fact_batch, fact_states,
                    answers, known, dict(scores.sources),
                    {d: _segment_nats(nll[d], tests[d]) for d in domains}, curve_idx)


@dataclasses.dataclass
class AdaptationRun:
    """One run: trained on ``domain`` at learning rate ``lr`` for ``epochs`` passes; ``known``: which
    facts the adapted model answers right (bool ``[N]``)."""

    domain: str
    lr: float
    result: AdaptResult
    known: torch.Tensor
    train_tokens: int
    epochs: int = 1


@dataclasses.dataclass
class Sweep:
    """Section 3 of chapter 3: every run; ``curves``, one row per (run, evaluation step, test domain)
    on the fixed curve subsets (tokens trained on, passes, change in bits per byte with its 95%
    interval over documents); ``changes``, one row per (run, test domain) after the run, on the
    whole test set of the trained domain (of every domain with ``score_all``) and on the curve
    subsets of the others (``test set``), with the base and adapted bits per byte, the change with
    its interval over documents and its ``direction`` (rise / fall only when the interval excludes 0)."""

    runs: list[AdaptationRun]
    curves: pd.DataFrame
    changes: pd.DataFrame
    domains: list[str]
    lrs: list[float]
    epochs: int
    n_train_layers: int
    base_bpb: dict[str, float]
    warmup: int = 0
    schedule: str = "constant"

    @property
    def end(self) -> pd.DataFrame:
        """``changes`` (the rows after each run's last step, on the whole test sets)."""
        return self.changes

    def same_domain(self) -> pd.Series:
        """Change in same-domain bits per byte after the run, indexed by (train domain, lr)."""
        c = self.changes
        return c[c["train domain"] == c["test domain"]].set_index(["train domain", "lr"])["delta bpb"]

    def records(self) -> dict:
        c = self.changes
        same = c[c["train domain"] == c["test domain"]]
        other = c[c["train domain"] != c["test domain"]]
        lo, hi = min(self.lrs), max(self.lrs)
        return {
            "curves": self.curves.to_dict(orient="records"), "changes": c.to_dict(orient="records"),
            "same_domain_change_bpb": same[["train domain", "lr", "delta bpb", "low", "high", "direction"]]
            .rename(columns={"train domain": "domain"}).to_dict(orient="records"),
            "base_bpb": self.base_bpb, "n_runs": len(self.runs), "epochs": self.epochs, "lr_min": lo, "lr_max": hi,
            "train_layers": self.n_train_layers, "warmup_steps": self.warmup, "schedule": self.schedule,
            "train_tokens_min": min(r.train_tokens for r in self.runs),
            "train_tokens_max": max(r.train_tokens for r in self.runs),
            "steps_per_run_max": max(r.result.eval_steps[-1] for r in self.runs),
            "n_runs_same_domain_rise": int((same.direction == "rise").sum()),
            "n_runs_same_domain_fall": int((same.direction == "fall").sum()),
            "n_runs_same_domain_unclear": int((same.direction == "unclear").sum()),
            "n_other_rise": int((other.direction == "rise").sum()), "n_other": len(other),
            "same_domain_change_min": float(same["delta bpb"].min()),
            "same_domain_change_max": float(same["delta bpb"].max()),
            "other_domain_change_mean": float(other["delta bpb"].mean()) if len(other) else 0.0,
            "closest_domain": min(self.domains, key=self.base_bpb.get),
        }


def _curve_rows(run: AdaptationRun, base: Baseline, domains, seed: int) -> list[dict]:
    rows, r = [], run.result
    for d in domains:
        idx = base.curve_idx[d]
        nbytes, docs = base.tests[d].nbytes[idx].numpy(), [base.sources[d][i] for i in idx]
        start = r.eval_segments[d][0]
        for step, seg in zip(r.eval_steps, r.eval_segments[d]):
            e = bpb_change(seg - start, nbytes, docs, seed=seed)
            rows.append({"train domain": run.domain, "lr": run.lr, "step": step,
                         "tokens": run.train_tokens * step / max(1, r.steps_per_epoch * run.epochs) * run.epochs,
                         "passes": step / r.steps_per_epoch, "test domain": d, "delta bpb": e.value,
                         "low": e.low, "high": e.high})
    return rows


def _change_rows(run: AdaptationRun, base: Baseline, domains, seed: int) -> list[dict]:
    """The change of every test domain after ``run``: on the whole test set where it was scored after
    the run (``final_nll``), else on the curve subset (the learning curve's last point)."""
    rows, r = [], run.result
    for d in domains:
        if d in r.final_nll:
            idx, after, what = list(range(len(base.tests[d]))), _segment_nats(r.final_nll[d], base.tests[d]), "whole"
        else:
            idx, after, what = base.curve_idx[d], r.eval_segments[d][-1], "curve subset"
        sc = base.tests[d].select(idx)
        before = base.segment_nats[d][idx]
        e = bpb_change(after - before, sc.nbytes.numpy(), [base.sources[d][i] for i in idx], seed=seed)
        b = float(before.sum()) / LN2 / float(sc.nbytes.sum())
        rows.append({"train domain": run.domain, "lr": run.lr, "test domain": d, "same": d == run.domain,
                     "test set": what, "base bpb": b, "bpb after": b + e.value, "delta bpb": e.value, "low": e.low,
                     "high": e.high, "direction": direction(e)})
    return rows


def adaptation_sweep(model, corpora, base: Baseline, *, lrs: Sequence[float], epochs: int = 1, batch_size: int = 8,
                     warmup: float = 0.1, schedule: str = "cosine", curve_points: int = 4, bf16: bool = True,
                     score_all: bool = False, seed: int = 0) -> Sweep:
    """Continue pretraining the blocks above ``base.n_frozen`` on each corpus's training segments,
    once per learning rate in ``lrs``, for ``epochs`` passes (1: one pass over fresh text, the
    paper's regime), with a linear warm-up over the first ``warmup`` share of the steps and then a
    ``schedule``, in ``bf16`` mixed precision. Each run scores the fixed curve subsets of every test
    domain at ``curve_points`` evenly spaced steps (the last one after the last step), the trained
    domain's whole test set after the last step (every domain's with ``score_all``; float32), and
    the facts after the last step. Every run starts from the base weights, which are checked to be
    back in place at the end."""
    check_int("curve_points", curve_points, 1)
    check_float("warmup", warmup, 0.0, 1.0)
    n_frozen = base.n_frozen
    n_train = model.num_layers - n_frozen
    domains = list(base.tests)
    evals = {d: base.curve_set(d) for d in domains}
    initial = {d: base.segment_nats[d][base.curve_idx[d]] for d in domains}
    base_weights = [p.detach().clone() for p in top_layer_parameters(model, n_train)]
    runs, n_warm = [], 0
    for c in corpora:
        train = encode_texts(model, c.train)
        train_states = prefix_states(model, train, n_frozen, bf16=bf16)
        per_epoch = math.ceil(len(train) / batch_size)
        total = per_epoch * epochs
        marks = [round(total * (i + 1) / curve_points) for i in range(curve_points)]
        marks += [per_epoch * (e + 1) for e in range(epochs)]  # and the end of every pass
        n_warm = round(warmup * total)
        finals = {d: (base.tests[d], base.states[d]) for d in domains if score_all or d == c.name}
        for lr in lrs:
            with restore_after(top_layer_parameters(model, n_train)):  # every run starts from the base model
                r = adapt(model, train, train_states, evals, n_train_layers=n_train, lr=lr, epochs=epochs,
                          batch_size=batch_size, eval_steps=marks, finals=finals, seed=seed, warmup=n_warm,
                          schedule=schedule, bf16=bf16, initial=initial, desc=f"{c.name}, lr={lr:g}")
                known = cached_last_top1(model, base.fact_batch, base.fact_states, n_frozen) == base.answers
            runs.append(AdaptationRun(c.name, lr, r, known, int(train.target_mask.sum()), epochs))
        del train_states
    if not all(torch.equal(p, q) for p, q in zip(top_layer_parameters(model, n_train), base_weights)):
        raise RuntimeError("the base weights were not restored after the sweep")
    curves = [row for run in runs for row in _curve_rows(run, base, domains, seed)]
    changes = [row for run in runs for row in _change_rows(run, base, domains, seed)]
    return Sweep(runs, pd.DataFrame(curves), pd.DataFrame(changes), domains, list(lrs), epochs, n_train,
                 {d: base.bits_per_byte(d) for d in domains}, n_warm, schedule)


@dataclasses.dataclass
class DepthComparison:
    """How much training only the top blocks (on cached lower-block states), and training in mixed
    precision, change a run: one small run per variant (number of trained blocks, ``precision``) on
    one ``domain``; ``table`` has, per variant, the change in bits per byte of each test domain's
    curve subset with its 95% interval over documents."""

    domain: str
    train_tokens: int
    table: pd.DataFrame

    def records(self) -> dict:
        t = self.table
        depths = sorted(set(t["train layers"]))
        return {"depth_domain": self.domain, "depth_train_tokens": self.train_tokens,
                "depth_table": t.to_dict(orient="records"), "depth_layers": depths,
                "depth_variants": list(dict.fromkeys(t["variant"]))}

    def same_domain(self, train_layers: int, precision: str) -> Estimate:
        """The change of the trained domain's curve subset for one variant, with its interval."""
        t = self.table
        row = t[(t["test domain"] == self.domain) & (t["train layers"] == train_layers)
                & (t["precision"] == precision)].iloc[0]
        return Estimate(float(row["delta bpb"]), float(row["low"]), float(row["high"]))


def depth_comparison(model, corpus, base: Baseline, train_layers: Sequence[int], *, lr: float, train_chars: int,
                     batch_size: int = 8, warmup: float = 0.1, schedule: str = "cosine", bf16: bool = True,
                     fp32_layers: Sequence[int] = (), seed: int = 0) -> DepthComparison:
    """Train on the first ``train_chars`` characters of ``corpus``'s training segments once for each
    number of top blocks in ``train_layers`` (``model.num_layers``: every block, no cache) with the
    sweep's settings, and once more in float32 for each number in ``fp32_layers`` (when ``bf16``),
    and score every domain's curve subset (float32) after the one pass."""
    check_int("train_chars", train_chars, 1)
    texts, used = [], 0
    for t in corpus.train:
        if texts and used + len(t) > train_chars:
            break
        texts.append(t)
        used += len(t)
    train = encode_texts(model, texts)
    domains = list(base.tests)
    total = math.ceil(len(train) / batch_size)
    rows = []
    variants = [(k, bf16) for k in train_layers] + ([(k, False) for k in fp32_layers] if bf16 else [])
    for k, half in variants:
        check_int("train_layers", k, 1, model.num_layers)
        n_frozen = model.num_layers - k
        evals = {}
        for d in domains:
            sc = base.tests[d].select(base.curve_idx[d])
            evals[d] = (sc, prefix_states(model, sc, n_frozen) if n_frozen != base.n_frozen else base.curve_set(d)[1])
        st = prefix_states(model, train, n_frozen, bf16=half)
        initial = {d: base.segment_nats[d][base.curve_idx[d]] for d in domains}
        precision = "bf16" if half else "float32"
        with restore_after(top_layer_parameters(model, k)):
            r = adapt(model, train, st, evals, n_train_layers=k, lr=lr, epochs=1, batch_size=batch_size,
                      seed=seed, warmup=round(warmup * total), schedule=schedule, bf16=half, initial=initial,
                      desc=f"{corpus.name}, top {k} blocks, {precision}")
        for d in domains:
            idx = base.curve_idx[d]
            e = bpb_change(r.eval_segments[d][-1] - r.eval_segments[d][0], base.tests[d].nbytes[idx].numpy(),
                           [base.sources[d][i] for i in idx], seed=seed)
            rows.append({"variant": f"top {k} blocks, {precision}", "train layers": k, "precision": precision,
                         "test domain": d, "delta bpb": e.value, "low": e.low, "high": e.high,
                         "direction": direction(e)})
    return DepthComparison(corpus.name, int(train.target_mask.sum()), pd.DataFrame(rows))


@dataclasses.dataclass
class Similarity:
    """How close each domain is to general text, by two stated measures: the base model's bits per
    byte on its test set, and the Jensen-Shannon divergence (bits) between the token unigram
    distribution of its training segments and that of a general-text ``reference`` sample; and the
    rank correlation of each measure with the same-domain change, over domains (n = the number of
    domains) and, for bits per byte, over test documents (each document's base bits per byte
    against its own change), each with a 95% bootstrap interval."""

    reference: str
    table: pd.DataFrame
    rho_divergence: Estimate
    rho_bpb: Estimate
    rho_documents: Estimate
    n_documents: int

    def records(self) -> dict:
        return {"similarity": self.table.to_dict(orient="records"), "similarity_reference": self.reference,
                "rho_divergence": self.rho_divergence.to_json(), "rho_base_bpb": self.rho_bpb.to_json(),
                "rho_documents": self.rho_documents.to_json(), "n_rho_documents": self.n_documents,
                "closest_by_divergence": str(self.table.set_index("domain")["JS divergence"].idxmin())}


def unigram_js(a_ids: Sequence[int], b_ids: Sequence[int]) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between the unigram distributions of two token-id lists."""
    a, b = np.asarray(a_ids), np.asarray(b_ids)
    vocab = np.union1d(a, b)
    p = np.bincount(np.searchsorted(vocab, a), minlength=len(vocab)) / len(a)
    q = np.bincount(np.searchsorted(vocab, b), minlength=len(vocab)) / len(b)
    m = (p + q) / 2

    def kl(x):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def similarity(model, corpora, sweep: Sweep, base: Baseline, reference: str, reference_texts: Sequence[str],
               lr: float | None = None, n_boot: int = 1000, seed: int = 0) -> Similarity:
    """Similarity of each domain to general text (:class:`Similarity`) and its rank correlation with the
    same-domain change in bits per byte of the runs at ``lr`` (default: the smallest)."""
    from lmbook.core.claims import bootstrap_stat

    tok = model.tokenizer
    lr = min(sweep.lrs) if lr is None else lr
    ref = [i for t in reference_texts for i in tok(t, add_special_tokens=False)["input_ids"]]
    ch = sweep.changes
    rows, docs = [], []
    for c in corpora:
        ids = [i for t in c.train for i in tok(t, add_special_tokens=False)["input_ids"]]
        row = ch[(ch["train domain"] == c.name) & (ch["test domain"] == c.name) & (ch.lr == lr)].iloc[0]
        rows.append({"domain": c.name, "base bpb": base.bits_per_byte(c.name), "JS divergence": unigram_js(ids, ref),
                     "same-domain change": float(row["delta bpb"]), "low": float(row["low"]),
                     "high": float(row["high"])})
        run = next(r for r in sweep.runs if r.domain == c.name and r.lr == lr)
        sc = base.tests[c.name]
        before, after = base.segment_nats[c.name], _segment_nats(run.result.final_nll[c.name], sc)
        nb = sc.nbytes.numpy().astype(float)
        src = np.asarray(base.sources[c.name])
        for doc in dict.fromkeys(base.sources[c.name]):
            m = src == doc
            docs.append((before[m].sum() / LN2 / nb[m].sum(), (after[m] - before[m]).sum() / LN2 / nb[m].sum()))
    table = pd.DataFrame(rows)
    x_div = table[["JS divergence", "same-domain change"]].to_numpy(float)
    x_bpb = table[["base bpb", "same-domain change"]].to_numpy(float)
    rho_div = bootstrap_stat(x_div, _spearman, n_boot, seed) if len(table) >= 3 else Estimate(math.nan, math.nan,
                                                                                                 math.nan)
    rho_bpb = bootstrap_stat(x_bpb, _spearman, n_boot, seed) if len(table) >= 3 else Estimate(math.nan, math.nan,
                                                                                                 math.nan)
    x_doc = np.asarray(docs, dtype=float)
    rho_doc = bootstrap_stat(x_doc, _spearman, n_boot, seed) if len(x_doc) >= 3 else Estimate(math.nan, math.nan,
                                                                                                 math.nan)
    return Similarity(reference, table, rho_div, rho_bpb, rho_doc, len(x_doc))


@dataclasses.dataclass
class ChangeDrivers:
    """Which tokens drive each run's same-domain change. ``contributions``: per run, each token
    class's share of the change in bits per byte (its tokens' summed loss change in bits over the
    test set's bytes, so the classes add up to ``total``), each with a 95% interval over test
    documents (``<class> low`` / ``<class> high``), and ``carriers``: the classes whose interval
    excludes 0 on the side of the total's change; ``tokens``: per run, the token types with the
    largest contributions."""

    contributions: pd.DataFrame
    tokens: pd.DataFrame

    def records(self) -> dict:
        c = self.contributions
        rises = c[c.direction == "rise"]
        falls = c[c.direction == "fall"]
        ws = c[WHITESPACE].sum(axis=1)
        carried = {k: int(sum(k in s.split(", ") for s in c.carriers)) for k in CLASSES}
        return {"contributions": c.to_dict(orient="records"), "n_rises": len(rises), "n_falls": len(falls),
                "n_changes": len(rises) + len(falls),
                "n_rises_whitespace_majority": int((rises[WHITESPACE].sum(axis=1) > 0.5 * rises.total).sum()),
                "n_rises_without_whitespace_still_rise": int((rises["total without whitespace"] > 0).sum()),
                "rise_total_mean": float(rises.total.mean()) if len(rises) else 0.0,
                "rise_whitespace_mean": float(rises[WHITESPACE].sum(axis=1).mean()) if len(rises) else 0.0,
                "rise_word_mean": float(rises["word"].mean()) if len(rises) else 0.0,
                "n_runs_whitespace_cheaper": int((ws < 0).sum()),
                "carrier_counts": carried, "top_carrier": max(CLASSES, key=lambda k: carried[k]),
                "n_runs_word_carries": carried["word"],
                "n_runs_ws_punct_carry": int(sum(any(k in s.split(", ") for k in WHITESPACE + ["punctuation"])
                                                 for s in c.carriers))}


def change_drivers(model, scores: ModelScores, sweep: Sweep, seed: int = 0, n_tokens: int = 4) -> ChangeDrivers:
    """Compare the per-token losses of each run's same-domain test set before (``scores``) and after
    training, by token class (bits per byte, intervals over documents) and by token type (the
    ``n_tokens`` largest contributions)."""
    contrib_rows, driver_rows = [], []
    for run in sweep.runs:
        d, lr = run.domain, run.lr
        before = scores.tokens[scores.main, d]
        seg, pos = (torch.tensor(before[k].to_numpy(dtype=np.int64)) for k in ("segment", "position"))
        after = run.result.final_nll[d][seg, pos - 1].numpy()
        t = before.assign(delta=after - before["nll"].to_numpy())
        sc = scores.tests[d]
        nbytes, src = sc.nbytes.numpy(), scores.sources[d]
        per = t.pivot_table(index="cls", columns="segment", values="delta", aggfunc="sum", fill_value=0.0)
        per = per.reindex(index=CLASSES, columns=range(len(sc)), fill_value=0.0)
        total = bpb_change(per.to_numpy().sum(0), nbytes, src, seed=seed)
        by_cls = dict(zip(CLASSES, bpb_change(per.to_numpy(), nbytes, src, seed=seed)))
        no_ws = bpb_change(per.drop(index=WHITESPACE).to_numpy().sum(0), nbytes, src, seed=seed)
        side = compare(total, 0)
        carriers = [k for k in CLASSES if side in ("greater", "less") and compare(by_cls[k], 0) == side]
        contrib_rows.append({"domain": d, "lr": lr, "total": total.value, "low": total.low, "high": total.high,
                             "direction": direction(total), **{k: by_cls[k].value for k in CLASSES},
                             **{f"{k} low": by_cls[k].low for k in CLASSES},
                             **{f"{k} high": by_cls[k].high for k in CLASSES},
                             "total without whitespace": no_ws.value, "carriers": ", ".join(carriers)})
        g = t.groupby("text")["delta"].agg(count="size", contribution="sum")
        g["contribution"] /= LN2 * nbytes.sum()
        g = g.reindex(g["contribution"].abs().sort_values(ascending=False).index).head(n_tokens).reset_index()
        driver_rows.append(g.assign(domain=d, lr=lr))
    return ChangeDrivers(pd.DataFrame(contrib_rows), pd.concat(driver_rows, ignore_index=True))


# --------------------------------------------------------------------------------------------------
# Section 4: perplexity and knowledge


@dataclasses.dataclass
class RecallChanges:
    """Section 4 of chapter 3: per run (``table``), recall before and after with the change's 95%
    bootstrap interval over facts, facts lost and gained, the run's same-domain and mean change in
    bits per byte, and the change on facts whose subject was (``seen``) or was not in the training
    split of the ``encyclopedia`` corpus."""

    table: pd.DataFrame
    recall_base: float
    n_facts: int
    seen: torch.Tensor
    lrs: list[float]

    def records(self) -> dict:
        r = self.table
        better = r["mean change bpb, all domains"] < 0
        rho = r["mean change bpb, all domains"].rank().corr(r["change"].rank())  # Spearman: Pearson on ranks
        return {"recall": r.to_dict(orient="records"), "n_facts": self.n_facts, "recall_base": self.recall_base,
                "recall_change_min": float(r["change"].min()), "recall_change_max": float(r["change"].max()),
                "facts_lost_max": int(r["lost"].max()), "facts_gained_max": int(r["gained"].max()),
                "n_runs_ppl_better_recall_worse": int((better & (r["change"] < 0)).sum()),
                "n_runs_ppl_worse_recall_better": int((~better & (r["change"] > 0)).sum()),
                "n_runs_ppl_better": int(better.sum()), "n_seen_facts": int(self.seen.sum()),
                "n_runs_recall_moved": int(((r["low"] > 0) | (r["high"] < 0)).sum()),
                "recall_bpb_spearman": float(rho)}  # nan where recall did not move (no ranking to correlate)

    def correlation(self, n_boot: int = 1000, seed: int = 0) -> Estimate:
        """The rank (Spearman) correlation between each run's mean change in bits per byte and its change in
        recall, with a 95% bootstrap interval over runs (resamples without a ranking to correlate are
        skipped); NaN with fewer than three runs or when either measure did not move."""
        from lmbook.core.claims import bootstrap_stat

        x = self.table[["mean change bpb, all domains", "change"]].to_numpy(dtype=float)
        if len(x) < 3:
            return Estimate(math.nan, math.nan, math.nan)
        return bootstrap_stat(x, _spearman, n_boot, seed)


def _spearman(x: np.ndarray) -> float:
    """Rank correlation of the two columns of ``x`` (Pearson on average ranks); NaN when one is constant."""
    a, b = pd.Series(x[:, 0]).rank(), pd.Series(x[:, 1]).rank()
    return float(a.corr(b)) if a.nunique() > 1 and b.nunique() > 1 else math.nan


def recall_changes(base: Baseline, sweep: Sweep, corpora, seed: int = 0) -> RecallChanges:
    """How recall of the facts changed in each run of ``sweep``, next to its change in bits per byte."""
    enc = next((c for c in corpora if c.name == "encyclopedia"), None)
    train_docs = set(enc.train_docs) if enc is not None else set()
    seen = torch.tensor([f.subject in train_docs for f in base.facts], dtype=torch.bool)
    known_base, ch, rows = base.known, sweep.changes, []
    for run in sweep.runs:
        diff = (run.known.float() - known_base.float()).numpy()
        mean, lo, hi = bootstrap_ci(diff, seed=seed)
        mine = ch[(ch["train domain"] == run.domain) & (ch.lr == run.lr)]
        row = {"domain": run.domain, "lr": run.lr, "recall before": float(known_base.float().mean()),
               "recall after": float(run.known.float().mean()), "change": float(mean), "low": float(lo),
               "high": float(hi), "lost": int((known_base & ~run.known).sum()),
               "gained": int((~known_base & run.known).sum()),
               "same-domain change bpb": float(mine[mine["test domain"] == run.domain]["delta bpb"].iloc[0]),
               "mean change bpb, all domains": float(mine["delta bpb"].mean())}
        for name, mask in [("seen subjects", seen), ("held-out subjects", ~seen)]:
            row[f"change, {name}"] = (float((run.known[mask].float() - known_base[mask].float()).mean())
                                      if mask.any() else float("nan"))
        rows.append(row)
    return RecallChanges(pd.DataFrame(rows), float(known_base.float().mean()), len(base.facts), seen, sweep.lrs)


def run_directions(sweep: Sweep, drivers: ChangeDrivers | None = None) -> pd.DataFrame:
    """One row per run of ``sweep``: ``domain``, ``lr``, the same-domain change in bits per byte
    (``change``, with ``low``/``high``, its 95% interval over test documents), the mean change of the
    *other* test domains (``other domains``, NaN with a single domain), how many of them rose beyond
    their intervals (``other rises``), and ``direction``: ``"rise"`` / ``"fall"`` when the
    same-domain interval lies wholly above / below zero, else ``"unclear"``."""
    c = sweep.changes
    rows = []
    for (d, lr), g in c.groupby(["train domain", "lr"], sort=False):
        same, other = g[g["test domain"] == d].iloc[0], g[g["test domain"] != d]
        rows.append({"domain": d, "lr": lr, "change": float(same["delta bpb"]), "low": float(same["low"]),
                     "high": float(same["high"]),
                     "other domains": float(other["delta bpb"].mean()) if len(other) else math.nan,
                     "other rises": int((other.direction == "rise").sum()), "direction": same["direction"]})
    return pd.DataFrame(rows, columns=["domain", "lr", "change", "low", "high", "other domains", "other rises",
                                       "direction"])
