"""Generation, with or without an intervention: the one home of decoding in the book.

Every generation runs through nnsight's ``model.generate`` with the key-value cache (one forward
over the prompts, then one token per step), on left-padded batches so that every row's next token
sits in the last column. An intervention is a function ``edit(model)`` called inside the
generation's trace:

* applied to the **prompt pass only** (``every_step=False``): it changes the prompt's keys and
  values, which later steps reuse. This is activation addition on the front of the prompt
  (chapter 4) and a task vector patched at the prompt's last token (chapter 6): later positions
  only read those positions' cached states, so editing them once equals editing them at every
  step of an uncached decoder;
* applied at **every step** (``every_step=True``): directional ablation and addition at every
  position, including the generated ones (chapter 5).

Sampling uses :class:`TopP` (temperature, then nucleus filtering over the top tokens), which
matches transformers' warper without sorting Gemma's 262k-token vocabulary at every step, and
:class:`NucleusDraw` draws the token itself from the kept top tokens: transformers' sampler draws
over the whole vocabulary, one random number per vocabulary entry and row, which on Gemma's
bfloat16 copy cost more than the model's forward (``bench/sampling.py``).
"""

from __future__ import annotations

from typing import Callable

import torch

from lmbook.core.models import generate
from lmbook.core.params import ParameterError, check_float, check_int, check_layers
from lmbook.core.tokens import Batch, left_padded, pad_token_id

__all__ = ["generate_ids", "TopP", "NucleusDraw", "greedy_tokens"]


class TopP:
    """Temperature, then nucleus (top-p) filtering as transformers' ``TopPLogitsWarper`` does it (keep the most probable
    tokens until their mass reaches ``top_p``), but looking only at the ``k`` most probable tokens
    when they already hold that mass: with Gemma's 262k-token vocabulary, sorting the whole
    vocabulary at every step costs more than the model's forward. Rows where the top ``k`` fall
    short are filtered over the full vocabulary. Tested against transformers' warper."""

    def __init__(self, top_p: float, temperature: float = 1.0, k: int = 1024):
        self.top_p, self.temperature, self.k = top_p, temperature, k

    def _nucleus(self, scores: torch.Tensor):
        """The top ``k`` scores ``vals`` and their ids ``idx`` (descending), which of them the
        nucleus keeps (``keep``: the tokens ranked above each hold less than ``top_p``), the rows
        whose top ``k`` hold less than ``top_p`` (``full``: they need the whole vocabulary) and
        each row's log-normaliser ``lse`` (float32). One home for :class:`TopP` and
        :class:`NucleusDraw`."""
        lse = scores.float().logsumexp(-1, keepdim=True)
        vals, idx = scores.topk(min(self.k, scores.shape[-1]), dim=-1)  # descending
        probs = (vals.float() - lse).exp()
        keep = (probs.cumsum(-1) - probs) < self.top_p  # mass of the tokens ranked above
        keep[:, 0] = True
        full = probs.sum(-1) < self.top_p
        return vals, idx, keep, full, lse

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            scores = scores / self.temperature
        vals, idx, keep, full, lse = self._nucleus(scores)
        if full.any():
            s, i = scores[full].float().sort(-1, descending=True)
            pr = (s - lse[full]).exp()
            kf = (pr.cumsum(-1) - pr) < self.top_p
            kf[:, 0] = True
            kept = torch.where(kf, s, float("-inf")).to(scores.dtype)
            out_full = torch.full_like(scores[full], float("-inf")).scatter(-1, i, kept)
        kept = torch.where(keep, vals, torch.full_like(vals, float("-inf")))
        out = torch.full_like(scores, float("-inf")).scatter(-1, idx, kept)
        if full.any():
            out[full] = out_full
        return out


class NucleusDraw(TopP):
    """Temperature and nucleus filtering as :class:`TopP`, then the draw itself: each row's token is
    drawn (``torch.multinomial``, torch's global generator) from the softmax of its kept scores, and
    the returned scores are 0 for that token and -inf elsewhere, so greedy decoding emits it. The
    distribution is transformers' (softmax of the filtered scores, then one draw), but where the
    nucleus lies within the top ``k`` tokens the draw runs over those ``k`` only, not the vocabulary.
    With ``top_p=1`` every token is kept (no filter, as transformers skips its warper)."""

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        token = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        if self.top_p >= 1.0:
            full = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        else:
            vals, idx, keep, full, _ = self._nucleus(scores)
            part = ~full
            if part.any():
                kept = torch.where(keep[part], vals[part], float("-inf")).softmax(-1)
                token[part] = idx[part].gather(1, torch.multinomial(kept, 1)).squeeze(1)
        if full.any():
            filtered = scores[full] if self.top_p >= 1.0 else TopP(self.top_p)(input_ids, scores[full])
            token[full] = torch.multinomial(filtered.softmax(-1), 1).squeeze(1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(1, token[:, None], 0.0)


def generate_ids(model, batch: Batch, max_new_tokens: int, edit: Callable | None = None, every_step: bool = False,
                 sample: bool = False, top_p: float = 1.0, temperature: float = 1.0, seed: int | None = None,
                 min_new_tokens: int | None = None) -> torch.Tensor:
    """New token ids ``[B, max_new_tokens]`` (fewer columns if every row ended) after each row of a
    **left-padded** ``batch`` (:func:`lmbook.core.tokens.left_padded`, or :func:`lmbook.core.tokens.pad_ids` with
    ``side="left"``).

    ``edit(model)`` is called inside the generation's trace, on the prompt pass or at every step
    (see the module docstring). Greedy by default; ``sample=True`` draws with ``temperature`` and
    nucleus ``top_p`` (:class:`TopP`) after seeding torch with ``seed``. Rows that end early are
    padded with the pad id."""
    check_int("max_new_tokens", max_new_tokens, 1, 4096)
    if batch.input_ids.shape[1] and not bool(batch.attention_mask[:, -1].all()):
        raise ParameterError("generate_ids needs a left-padded batch (every row's last token in the last column)")
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(model), do_sample=sample)
    if min_new_tokens is not None:
        kwargs["min_new_tokens"] = check_int("min_new_tokens", min_new_tokens, 0, max_new_tokens)
    if sample:
        from transformers import LogitsProcessorList

        check_float("top_p", top_p, 1e-6, 1.0)
        check_float("temperature", temperature, 1e-6, 100.0)
        # NucleusDraw applies the temperature and the nucleus filter and draws the token itself;
        # transformers then decodes greedily (its own sampler would draw over the whole vocabulary).
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      logits_processor=LogitsProcessorList([NucleusDraw(top_p, temperature)]))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    width = batch.input_ids.shape[1]
    with torch.no_grad(), generate(model, batch, **kwargs) as tracer:
        if edit is not None and every_step:
            with tracer.all():
                edit(model)
        elif edit is not None:
            edit(model)
        ids = model.generator.output.save()
    return ids[:, width:].cpu()


def greedy_tokens(model, batch: Batch, n_tokens: int, layer: int | None = None, vectors: torch.Tensor | None = None,
                  mode: str = "replace", patch_rows=None) -> list[list[int]]:
    """Greedy continuations of ``n_tokens`` token ids for each prompt of ``batch`` (either padding).

    With ``layer`` and ``vectors`` the residual stream after ``layer`` at each prompt's last token
    is replaced (or incremented, ``mode="add"``) by ``vectors`` (``[d]``, or one row per patched
    row) for the rows ``patch_rows`` (default all), in the prompt pass (see the module docstring:
    with the cache this equals patching that position at every step). The first id of each
    continuation is the model's top-1 next token. Chapter 6 decodes task-vector answers with it."""
    check_int("n_tokens", n_tokens, 1)
    lb = left_padded(model, batch)
    edit = None
    if layer is not None:
        if mode not in ("replace", "add"):
            raise ParameterError(f"mode={mode!r}; use 'replace' or 'add'")
        layer = check_layers("layer", layer, model.num_layers)[0]
        prow = torch.arange(len(batch)) if patch_rows is None else torch.as_tensor(list(patch_rows), dtype=torch.long)
        vec = torch.as_tensor(vectors).float()
        if vec.ndim == 1:
            vec = vec[None].expand(len(prow), -1)
        if vec.shape != (len(prow), model.hidden_size):
            raise ParameterError(f"vectors must be [d] or [{len(prow)}, {model.hidden_size}], got {tuple(vec.shape)}")
        last = lb.input_ids.shape[1] - 1

        def edit(m):
            h = m.layers_output[layer]
            v = vec.to(device=h.device, dtype=h.dtype)
            h[prow, last] = v if mode == "replace" else h[prow, last] + v

    return generate_ids(model, lb, n_tokens, edit=edit, min_new_tokens=n_tokens).tolist()
