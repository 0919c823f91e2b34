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
from lmbook.core.params import check_int
from lmbook.core.stats import bootstrap_ci
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
           "ModelScores", "score_models", "TokenizerGap", "tokenizer_gap", "LossConcentration", "loss_concentration",
           "Baseline", "adaptation_baseline", "AdaptationRun", "Sweep", "adaptation_sweep", "ChangeDrivers",
           "change_drivers", "RecallChanges", "recall_changes", "run_directions"]

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
    """Continue pretraining the top ``n_train_layers`` blocks (and the final norm) on ``train``
    (:func:`lmbook.mechanisms.training.train_top_layers`) and score the eval sets along the way.

    ``train_states`` and the states in ``evals`` (``{name: (scored, states)}``) come from
    :func:`lmbook.mechanisms.training.prefix_states` with ``n_frozen = model.num_layers -
    n_train_layers``. The eval sets are scored at step 0, every ``eval_every`` steps (or at
    ``eval_steps``) and after the last step. The weights are changed in place: wrap the call in
    :func:`lmbook.mechanisms.training.restore_after`. ``epochs=0`` trains nothing and scores the
    eval sets once. ``initial_nats`` (``{name: total nats}`` of the base model, the same for every
    run) spares scoring the eval sets again at step 0.
    """
    check_int("epochs", epochs, 0)
    n_frozen = model.num_layers - n_train_layers
    per_epoch = math.ceil(len(train) / batch_size)
    total = per_epoch * epochs
    marks = set(eval_steps or []) | {0, total}
    if eval_every:
        marks |= set(range(0, total + 1, eval_every))
    marks = sorted(m for m in marks if 0 <= m <= total)
    res = AdaptResult(marks, {k: [] for k in evals}, {}, [], per_epoch)

    def evaluate(step):
        if step not in marks:
            return
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
    res.train_loss = train_top_layers(model, train, train_states, n_train_layers=n_train_layers, lr=lr,
                                      epochs=epochs, batch_size=batch_size, seed=seed, max_grad_norm=max_grad_norm,
                                      on_step=evaluate, desc=desc)
    return res


# --------------------------------------------------------------------------------------------------
# Section 1: every model on every domain, and what the tokenizer does to perplexity


@dataclasses.dataclass
class ModelScores:
    """Section 1 of chapter 3. ``table``: one row per (model, domain) with :func:`summarize`'s
    columns; ``tokens[model, domain]``: its :func:`token_table`. For the trained model ``main``:
    ``tests[domain]`` (the encoded test segments), ``nll[domain]`` (``[B, T-1]`` per-token losses)
    and ``states[domain]`` (the output of its lower ``n_frozen`` blocks, ``None`` when 0)."""

    main: str
    models: list[str]
    domains: list[str]
    n_frozen: int
    table: pd.DataFrame
    tokens: dict[tuple[str, str], pd.DataFrame]
    tests: dict[str, Scored]
    nll: dict[str, torch.Tensor]
    states: dict[str, torch.Tensor | None]

    def records(self) -> dict:
        return {"scores": self.table.to_dict(orient="records"), "n_scored_models": len(self.models)}


def score_models(model, main: str, models: Sequence[str], corpora, *, n_frozen: int, device: str = "auto",
                 batch_size: int = 4) -> ModelScores:
    """Score the test segments of every corpus with every model in ``models`` (``main`` is the
    loaded ``model``; the others are loaded here, one at a time). For ``main`` the same traces
    also keep the output of its lower ``n_frozen`` blocks, which section 3 trains on top of."""
    from lmbook.core.models import load_model

    check_int("n_frozen", n_frozen, 0, model.num_layers - 1)
    rows, tables, tests, nlls, states = [], {}, {}, {}, {}
    for name in models:
        m = model if name == main else load_model(name, device=device)
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
        del m
    return ModelScores(main, list(models), [c.name for c in corpora], n_frozen, pd.DataFrame(rows), tables,
                       tests, nlls, states)


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
# Section 3: continued pretraining, swept over domains and learning rates


@dataclasses.dataclass
class Baseline:
    """Section 3's starting point: the base model's test losses computed from cached lower blocks
    (``nll``; ``cache_error`` is their largest difference from the full model's), total nats, bytes
    and tokens per test domain, and the facts with the base model's top-1 answers (``known``)."""

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

    def bits_per_byte(self, domain: str, nats: float | None = None) -> float:
        """Bits per byte of ``domain``'s test set for total ``nats`` (default: the base model's)."""
        return (self.initial[domain] if nats is None else nats) / LN2 / self.nbytes[domain]


def adaptation_baseline(model, scores: ModelScores, facts: Sequence[Fact], tol: float = 1e-3) -> Baseline:
    """Check the cached lower blocks against the full model (the test losses of section 1, and the
    top-1 answer to every fact) and collect what every run of :func:`adaptation_sweep` starts from.
    A fact is *known* as in chapter 2 (:func:`lmbook.experiments.recall.known_mask`): the model's
    top-1 next token after its prompt is the attribute's first token."""
    n_frozen, domains = scores.n_frozen, scores.domains
    tests, states = scores.tests, scores.states
    nll = {d: cached_nll(model, tests[d], states[d], n_frozen) for d in domains}
    error = max(float((nll[d] - scores.nll[d]).abs().max()) for d in domains)
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
                    answers, known)


@dataclasses.dataclass
class AdaptationRun:
    """One run of the sweep: trained on ``domain`` at learning rate ``lr``; ``known``: which facts the
    adapted model answers right (bool ``[N]``)."""

    domain: str
    lr: float
    result: AdaptResult
    known: torch.Tensor
    train_tokens: int


@dataclasses.dataclass
class Sweep:
    """Section 3 of chapter 3: every run, and ``curves``, one row per (run, evaluation step, test
    domain) with bits per byte, perplexity and the change in bits per byte since step 0."""

    runs: list[AdaptationRun]
    curves: pd.DataFrame
    domains: list[str]
    lrs: list[float]
    epochs: int
    n_train_layers: int
    base_bpb: dict[str, float]

    @property
    def end(self) -> pd.DataFrame:
        """The rows of ``curves`` after each run's last step."""
        c = self.curves
        return c[c.step == c.groupby(["train domain", "lr"])["step"].transform("max")]

    def same_domain(self, passes: float | None = None) -> pd.Series:
        """Change in same-domain bits per byte, indexed by (train domain, lr), after ``passes``
        passes (default: after the last step)."""
        c = self.end if passes is None else self.curves[np.isclose(self.curves.passes, passes)]
        return c[c["train domain"] == c["test domain"]].set_index(["train domain", "lr"])["delta bpb"]

    def records(self) -> dict:
        end, same_end, same_first = self.end, self.same_domain(), self.same_domain(1.0)
        lo, hi = min(self.lrs), max(self.lrs)
        other = end[end["train domain"] != end["test domain"]]
        return {
            "curves": self.curves.to_dict(orient="records"),
            "same_domain_change_bpb": [{"domain": d, "lr": lr, "after 1 pass": float(same_first[d, lr]),
                                        "after all passes": float(same_end[d, lr])}
                                       for d in self.domains for lr in self.lrs],
            "base_bpb": self.base_bpb, "n_runs": len(self.runs), "epochs": self.epochs, "lr_min": lo, "lr_max": hi,
            "train_layers": self.n_train_layers,
            "n_runs_same_domain_rise": int((same_end > 0).sum()), "n_runs_same_domain_fall": int((same_end <= 0).sum()),
            "same_domain_change_min": float(same_end.min()), "same_domain_change_max": float(same_end.max()),
            "same_domain_change_at_lr_min_mean": float(same_end.xs(lo, level="lr").mean()),
            "same_domain_change_at_lr_max_mean": float(same_end.xs(hi, level="lr").mean()),
            "other_domain_change_mean": float(other["delta bpb"].mean()) if len(other) else 0.0,
            "closest_domain": min(self.domains, key=self.base_bpb.get),
            "largest_rise_domain_at_lr_max": str(same_end.xs(hi, level="lr").idxmax()),
            "largest_fall_domain_at_lr_min": str(same_end.xs(lo, level="lr").idxmin()),
        }


def adaptation_sweep(model, corpora, base: Baseline, *, lrs: Sequence[float], epochs: int, batch_size: int = 4,
                     seed: int = 0) -> Sweep:
    """Continue pretraining the blocks above ``base.n_frozen`` on each corpus's training segments,
    once per learning rate in ``lrs``, for ``epochs`` passes, scoring every domain's test segments
    after each pass (:func:`adapt`) and the facts after the last; every run starts from the base
    weights, which are checked to be back in place at the end."""
    n_frozen = base.n_frozen
    n_train = model.num_layers - n_frozen
    domains = list(base.tests)
    evals = {d: (base.tests[d], base.states[d]) for d in domains}
    base_weights = [p.detach().clone() for p in top_layer_parameters(model, n_train)]
    runs = []
    for c in corpora:
        train = encode_texts(model, c.train)
        train_states = prefix_states(model, train, n_frozen)
        per_epoch = math.ceil(len(train) / batch_size)
        for lr in lrs:
            with restore_after(top_layer_parameters(model, n_train)):  # every run starts from the base model
                r = adapt(model, train, train_states, evals, n_train_layers=n_train, lr=lr, epochs=epochs,
                          batch_size=batch_size, eval_every=per_epoch, seed=seed, initial_nats=base.initial,
                          desc=f"{c.name}, lr={lr:g}")
                known = cached_last_top1(model, base.fact_batch, base.fact_states, n_frozen) == base.answers
            runs.append(AdaptationRun(c.name, lr, r, known, int(train.target_mask.sum())))
    if not all(torch.equal(p, q) for p, q in zip(top_layer_parameters(model, n_train), base_weights)):
        raise RuntimeError("the base weights were not restored after the sweep")
    rows = []
    for run in runs:
        r = run.result
        for d in domains:
            for step, nats in zip(r.eval_steps, r.eval_nats[d]):
                rows.append({"train domain": run.domain, "lr": run.lr, "step": step, "passes": step / r.steps_per_epoch,
                             "test domain": d, "bits_per_byte": base.bits_per_byte(d, nats),
                             "ppl": math.exp(nats / base.ntokens[d]),
                             "delta bpb": (nats - base.initial[d]) / LN2 / base.nbytes[d]})
    return Sweep(runs, pd.DataFrame(rows), domains, list(lrs), epochs, n_train,
                 {d: base.bits_per_byte(d) for d in domains})


@dataclasses.dataclass
class ChangeDrivers:
    """Which tokens drive each run's same-domain change. ``contributions``: per run, each token
    class's summed loss change over the number of test tokens (they add up to ``total``, the change
    of the mean loss, with a 95% bootstrap interval ``low``..``high`` over tokens) and the change
    without whitespace; ``tokens``: per run, the token types with the largest contributions."""

    contributions: pd.DataFrame
    tokens: pd.DataFrame

    def records(self) -> dict:
        c = self.contributions
        rises = c[c.total > 0]
        rises_ws = rises[WHITESPACE].sum(axis=1)
        return {"contributions": c.to_dict(orient="records"), "n_rises": len(rises),
                "n_rises_whitespace_majority": int((rises_ws > 0.5 * rises.total).sum()),
                "n_rises_without_whitespace_still_rise": int((rises["total without whitespace"] > 0).sum()),
                "rise_total_mean": float(rises.total.mean()) if len(rises) else 0.0,
                "rise_whitespace_mean": float(rises_ws.mean()) if len(rises) else 0.0,
                "rise_word_mean": float(rises["word"].mean()) if len(rises) else 0.0,
                "n_runs_whitespace_cheaper": int((c[WHITESPACE].sum(axis=1) < 0).sum())}


def change_drivers(model, scores: ModelScores, sweep: Sweep, seed: int = 0, n_tokens: int = 4) -> ChangeDrivers:
    """Compare the per-token losses of each run's same-domain test set before (``scores``) and after
    training, by token class and by token type (the ``n_tokens`` largest contributions)."""
    contrib_rows, driver_rows = [], []
    for run in sweep.runs:
        d, lr = run.domain, run.lr
        before = scores.tokens[scores.main, d]
        after = token_table(model.tokenizer, scores.tests[d], run.result.final_nll[d])
        t = before.assign(delta=after["nll"].to_numpy() - before["nll"].to_numpy())
        n = len(t)
        by_cls = t.groupby("cls")["delta"].sum() / n
        _, lo, hi = bootstrap_ci(t["delta"].to_numpy(), seed=seed)  # 95% interval over test tokens
        contrib_rows.append({"domain": d, "lr": lr, "total": t["delta"].sum() / n, "low": float(lo), "high": float(hi),
                             **{c: float(by_cls.get(c, 0.0)) for c in CLASSES},
                             "total without whitespace": t.loc[~t["cls"].isin(WHITESPACE), "delta"].mean()})
        g = t.groupby("text")["delta"].agg(count="size", contribution="sum")
        g["contribution"] /= n
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
                "recall_change_at_lr_min_mean": float(r[r.lr == min(self.lrs)]["change"].mean()),
                "recall_change_at_lr_max_mean": float(r[r.lr == max(self.lrs)]["change"].mean()),
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
    known_base, end, rows = base.known, sweep.end, []
    for run in sweep.runs:
        diff = (run.known.float() - known_base.float()).numpy()
        mean, lo, hi = bootstrap_ci(diff, seed=seed)
        same = end[(end["train domain"] == run.domain) & (end.lr == run.lr)]
        row = {"domain": run.domain, "lr": run.lr, "recall before": float(known_base.float().mean()),
               "recall after": float(run.known.float().mean()), "change": float(mean), "low": float(lo),
               "high": float(hi), "lost": int((known_base & ~run.known).sum()),
               "gained": int((~known_base & run.known).sum()),
               "same-domain change bpb": float(same[same["test domain"] == run.domain]["delta bpb"].iloc[0]),
               "mean change bpb, all domains": float(same["delta bpb"].mean())}
        for name, mask in [("seen subjects", seen), ("held-out subjects", ~seen)]:
            row[f"change, {name}"] = (float((run.known[mask].float() - known_base[mask].float()).mean())
                                      if mask.any() else float("nan"))
        rows.append(row)
    return RecallChanges(pd.DataFrame(rows), float(known_base.float().mean()), len(base.facts), seen, sweep.lrs)


def run_directions(sweep: Sweep, drivers: ChangeDrivers) -> pd.DataFrame:
    """One row per run of ``sweep``: ``domain``, ``lr``, the same-domain change in bits per byte after one pass
    (``after 1 pass``) and after all (``change``), the mean change of the *other* test domains (``other
    domains``, NaN with a single domain), and ``direction``: ``"rise"`` / ``"fall"`` when the 95% interval over
    test tokens of the run's change of the mean loss (:class:`ChangeDrivers`) lies wholly above / below zero,
    else ``"unclear"``."""
    end, first = sweep.same_domain(), sweep.same_domain(1.0)
    e = sweep.end
    rows = []
    for _, c in drivers.contributions.iterrows():
        d, lr = c["domain"], c["lr"]
        other = e[(e["train domain"] == d) & (e.lr == lr) & (e["test domain"] != d)]["delta bpb"]
        o = compare(Estimate(c["total"], min(c["low"], c["total"]), max(c["high"], c["total"])), 0)
        rows.append({"domain": d, "lr": lr, "after 1 pass": float(first[d, lr]), "change": float(end[d, lr]),
                     "other domains": float(other.mean()) if len(other) else math.nan,
                     "direction": {"greater": "rise", "less": "fall"}.get(o, "unclear")})
    return pd.DataFrame(rows, columns=["domain", "lr", "after 1 pass", "change", "other domains", "direction"])
