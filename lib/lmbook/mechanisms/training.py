"""Short supervised fine-tunes on a CPU: low-rank adapters (LoRA) or a few unfrozen layers.

Introduced in chapter 5, which teaches a model that never refuses to refuse harmful requests
before looking for the direction that mediates the refusal. The model is trained on
``(prompt, reply)`` pairs with the loss on the reply's tokens only.

* ``method="lora"`` (Hu et al., 2021) adds ``(alpha / rank) * B A x`` to the output of every linear
  module inside the chosen layers, with ``A`` ``[rank, in]`` random and ``B`` ``[out, rank]`` zero, so
  training starts from the model itself. The adapters live in forward hooks during training and are
  then **merged** into the weights (``W += (alpha / rank) B A``) and the hooks removed: afterwards
  the model is an ordinary model of the same shape, which nnsight traces like any other.
* ``method="layers"`` unfreezes every parameter of the chosen layers and freezes them again afterwards.

Training runs on the underlying transformers model (``model._model``) outside any nnsight trace.
Logits are computed only at the positions whose next token is scored, which for a 262k-token
vocabulary (Gemma 3) is most of the saving.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from lmbook.core.params import ParameterError, check_choice, check_float, check_int, check_layers
from lmbook.core.tokens import pad_token_id

__all__ = ["FinetuneResult", "attach_lora", "finetune", "reply_loss", "tokenize_pairs"]


@dataclasses.dataclass
class FinetuneResult:
    """``losses``: mean reply-token loss at each step; ``trained``: number of parameters trained."""

    losses: list[float]
    trained: int
    method: str
    layers: list[int]


class _LoRA:
    """LoRA adapters on a list of ``nn.Linear`` modules, applied through forward hooks."""

    def __init__(self, linears: list[torch.nn.Linear], rank: int, alpha: float, generator: torch.Generator):
        self.linears = linears
        self.scale = alpha / rank
        self.A, self.B, self.handles = [], [], []
        for lin in linears:
            dev, dt = lin.weight.device, torch.float32
            a = (torch.randn(rank, lin.in_features, generator=generator) / math.sqrt(lin.in_features)).to(dev, dt)
            A = torch.nn.Parameter(a)
            B = torch.nn.Parameter(torch.zeros(lin.out_features, rank, device=dev, dtype=dt))
            self.A.append(A)
            self.B.append(B)
            self.handles.append(lin.register_forward_hook(self._hook(A, B)))

    def _hook(self, A, B):
        def hook(module, inputs, output):
            x = inputs[0]
            return output + (x.to(A.dtype) @ A.T @ B.T * self.scale).to(output.dtype)

        return hook

    def parameters(self):
        return [*self.A, *self.B]

    def merge(self) -> None:
        """Fold the adapters into the weights and remove the hooks."""
        with torch.no_grad():
            for lin, A, B in zip(self.linears, self.A, self.B):
                lin.weight += (B @ A * self.scale).to(lin.weight.dtype)
        self.remove()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _layer_modules(model, layers: list[int]) -> list[torch.nn.Module]:
    return [model.layers[l]._module for l in layers]


def attach_lora(model, layers, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> _LoRA:
    """LoRA adapters on every ``nn.Linear`` inside ``layers``; returns the handle (``.parameters()``,
    ``.merge()``, ``.remove()``)."""
    layers = check_layers("layers", layers, model.num_layers)
    check_int("rank", rank, 1, 4096)
    linears = [m for block in _layer_modules(model, layers) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ParameterError(f"no linear modules found in layers {layers} of {type(model._model).__name__}")
    return _LoRA(linears, rank, alpha, torch.Generator().manual_seed(seed))


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]], add_special_tokens: bool = False, end: str | None = None):
    """Token ids of ``prompt + reply`` for each pair and the labels (``-100`` on the prompt's tokens).

    The prompt and the reply are tokenised separately and concatenated, so the boundary is exact;
    ``end`` (e.g. the chat template's end-of-turn token) is appended to replies that should stop there.
    Returns a list of ``(ids, labels)``.
    """
    out = []
    for prompt, reply in pairs:
        p = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        r = tokenizer(reply + (end or ""), add_special_tokens=False)["input_ids"]
        out.append((p + r, [-100] * len(p) + r))
    return out


def _collate(items, pad_id: int):
    width = max(len(i) for i, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for k, (i, l) in enumerate(items):
        ids[k, : len(i)] = torch.tensor(i)
        labels[k, : len(l)] = torch.tensor(l)
        mask[k, : len(i)] = 1
    return ids, labels, mask


def _reply_loss(hf, ids, labels, mask) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens, with logits only where a label is scored."""
    hidden = hf.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, d]
    target = labels[:, 1:]
    keep = target != -100
    logits = hf.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def finetune(
    model,
    pairs: Sequence[tuple[str, str]],
    method: str = "lora",
    layers=None,
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    rank: int = 8,
    alpha: float = 16.0,
    add_special_tokens: bool = False,
    end: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``model`` in place on ``(prompt, reply)`` pairs for ``steps`` AdamW steps of
    ``batch_size`` pairs (reshuffled every pass through the data), loss on the replies only.

    ``layers``: which layers to adapt (default all for LoRA); ``end``: a string appended to every
    reply (see :func:`tokenize_pairs`). LoRA adapters are merged into the weights at the end.
    """
    check_choice("method", method, ("lora", "layers"))
    check_int("steps", steps, 0, 100_000)
    check_int("batch_size", batch_size, 1, 4096)
    check_float("lr", lr, 0.0, 1.0)
    if not pairs:
        raise ParameterError("finetune needs at least one (prompt, reply) pair")
    if getattr(model, "lmbook_remote", False):
        raise ParameterError("a model loaded with remote=True runs on NDIF and cannot be fine-tuned here")
    layers = check_layers("layers", layers, model.num_layers)
    if not getattr(model, "dispatched", True):
        model.dispatch()
    hf = model._model
    tok = model.tokenizer
    data = tokenize_pairs(tok, pairs, add_special_tokens=add_special_tokens, end=end)
    pad = pad_token_id(tok)
    gen = torch.Generator().manual_seed(seed)
    if method == "lora":
        lora = attach_lora(model, layers, rank, alpha, seed)
        params = lora.parameters()
    else:
        lora = None
        params = [p for block in _layer_modules(model, layers) for p in block.parameters()]
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from tqdm.auto import tqdm

    losses, order = [], []
    was_training = hf.training
    hf.train(False)  # no dropout: the small models here have none anyway, and eval keeps it so
    try:
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc=f"fine-tune ({method})", disable=not progress):
                if len(order) < batch_size:
                    order += torch.randperm(len(data), generator=gen).tolist()
                idx, order = order[:batch_size], order[batch_size:]
                ids, labels, mask = _collate([data[i] for i in idx], pad)
                loss = _reply_loss(hf, ids.to(hf.device), labels.to(hf.device), mask.to(hf.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        if lora is not None:
            lora.merge()
        else:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        hf.train(was_training)
    return FinetuneResult(losses, sum(p.numel() for p in params), method, layers)


def reply_loss(model, pairs: Sequence[tuple[str, str]], add_special_tokens: bool = False, end: str | None = None,
               batch_size: int = 16) -> float:
    """Mean reply-token loss of ``model`` on ``pairs`` (no gradient): for checking a fine-tune."""
    tok = model.tokenizer
    data = tokenize_pairs(tok, pairs, add_special_tokens=add_special_tokens, end=end)
    pad = pad_token_id(tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            chunk = data[start:start + batch_size]
            ids, labels, mask = _collate(chunk, pad)
            n = int((labels[:, 1:] != -100).sum())
            total += float(_reply_loss(model._model, ids, labels, mask)) * n
            count += n
    return total / count
