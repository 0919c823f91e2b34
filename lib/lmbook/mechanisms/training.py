"""Training a model on a CPU: which parameters, one AdamW loop, and two cheap ways to train.

One home for training. Chapter 3 ("Perplexity pitfalls") continues pretraining the top blocks of a
model on raw text; chapter 5 ("Refusal direction") fine-tunes a model with low-rank adapters
(LoRA) on ``(prompt, reply)`` pairs. Both run :func:`adamw_loop`: AdamW (constant learning rate, or
chapter 3's warm-up and decay, :func:`lr_schedule`), no weight decay, optional clipping, a seeded order of examples
(:func:`shuffled_batches`), the loss of each step recorded, and the optimiser's state dropped at
the end. Training runs on the underlying transformers model (``model._model``) outside any nnsight
trace.

* **Top blocks on cached lower-layer states** (chapter 3, :func:`train_top_layers`). Only the top
  ``k`` blocks and the final norm are trained (:func:`top_layer_parameters`). The lower blocks are
  frozen, so their output on a fixed text never changes: :func:`prefix_states` computes it once (an
  nnsight trace) and :func:`skip_lower_layers` swaps the lower blocks for a stub that returns those
  cached states, so every training step and every evaluation (:func:`cached_nll`,
  :func:`cached_last_top1`) runs only the top blocks and the unembedding. ``tests/test_training.py``
  checks that this gives the full model's losses. :func:`restore_after` puts the weights back.
* **LoRA** (chapter 5, :func:`finetune`; Hu et al., 2021) adds ``(alpha / rank) * B A x`` to the
  output of every linear module inside the chosen layers, with ``A`` ``[rank, in]`` random and ``B``
  ``[out, rank]`` zero, so training starts from the model itself. The adapters live in forward hooks
  during training and are then **merged** into the weights (``W += (alpha / rank) B A``) and the
  hooks removed: afterwards the model is an ordinary model of the same shape, which nnsight traces
  like any other. ``method="layers"`` instead unfreezes every parameter of the chosen layers and
  freezes them again afterwards. The loss is on the reply's tokens only, and logits are computed
  only at the positions whose next token is scored, which for a 262k-token vocabulary (Gemma 3) is
  most of the saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterable, Sequence

import torch

from lmbook.core.models import refuse_remote, trace
from lmbook.core.params import ParameterError, check_choice, check_float, check_int, check_layers
from lmbook.core.tokens import Batch, pad_token_id
from lmbook.mechanisms.likelihood import Scored, as_batch, length_batches, logits_nll
from lmbook.mechanisms.readout import softcap

__all__ = ["layer_modules", "final_norm", "top_layer_parameters", "restore_after",
           "skip_lower_layers", "prefix_states", "cached_nll", "cached_last_top1",
           "shuffled_batches", "lr_schedule", "adamw_loop", "train_top_layers",
           "FinetuneResult", "attach_lora", "tokenize_pairs", "finetune", "reply_loss"]


# --------------------------------------------------------------------------------------------------
# Which parameters


def layer_modules(model) -> torch.nn.ModuleList:
    """The model's list of transformer blocks (the module behind nnterp's ``model.layers``)."""
    layers = getattr(model.layers, "_module", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ParameterError("could not find the model's list of layers behind model.layers")
    return layers


def final_norm(model) -> torch.nn.Module:
    """The norm before the unembedding (the module behind nnterp's ``model.ln_final``)."""
    return model.ln_final._module


def _unique(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def top_layer_parameters(model, n_train_layers: int) -> list[torch.nn.Parameter]:
    """Parameters of the top ``n_train_layers`` blocks and of the final norm (the ones
    :func:`train_top_layers` trains). Embeddings and the unembedding stay frozen."""
    n = model.num_layers
    check_int("n_train_layers", n_train_layers, 1, n)
    layers = layer_modules(model)
    params = [p for i in range(n - n_train_layers, n) for p in layers[i].parameters()]
    return _unique(params + list(final_norm(model).parameters()))


@contextlib.contextmanager
def restore_after(params: Sequence[torch.nn.Parameter]):
    """Keep a CPU copy of ``params`` and write it back on exit, so every training run starts from the
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


# --------------------------------------------------------------------------------------------------
# Frozen lower blocks, run once and cached


class _CachedOutput(torch.nn.Module):
    """Stands in for the frozen lower blocks: returns the cached residual stream it is given."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.value is None:
            raise RuntimeError("skip_lower_layers: set the cached states before the forward pass")
        if self.value.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError(f"cached states {tuple(self.value.shape)} do not match the input "
                               f"{tuple(hidden_states.shape)}")
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


def prefix_states(model, texts: Scored | Batch, n_frozen: int, batch_size: int = 8,
                  bf16: bool = False) -> torch.Tensor | None:
    """Residual stream after block ``n_frozen - 1`` at every position, ``[B, T, d]`` (nnsight), or
    ``None`` when ``n_frozen == 0`` (nothing is frozen, nothing to cache). ``texts`` is a
    :class:`lmbook.mechanisms.likelihood.Scored` or a :class:`lmbook.core.tokens.Batch`. ``bf16``:
    run the blocks under bfloat16 autocast (mixed precision, as :func:`train_top_layers` with
    ``bf16=True`` trains; the states are stored in float32)."""
    refuse_remote(model, "training the top blocks (prefix_states)")
    check_int("n_frozen", n_frozen, 0, model.num_layers - 1)
    if n_frozen == 0:
        return None
    batch = as_batch(texts)
    T = batch.input_ids.shape[1]
    out = torch.zeros(len(batch), T, model.hidden_size)
    for idx in length_batches(batch, batch_size):
        sub = batch.select(idx)
        # no logits, and the forward stops after block n_frozen - 1: the cache costs the lower blocks only
        with torch.no_grad(), _autocast(model, bf16), trace(model, sub, last_only=True) as tracer:
            h = model.layers_output[n_frozen - 1].save()
            tracer.stop()
        out[idx, : sub.input_ids.shape[1]] = h.float().cpu()
    return out


def _autocast(model, enabled: bool):
    """bfloat16 autocast on the model's device type (a no-op context when not ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext()
    device = next(model._model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _cached_forward(model, stub, states, sub: Batch, **kwargs) -> torch.Tensor:
    """Logits of ``sub`` with the lower blocks replaced by ``states`` of its rows (``stub`` is the one
    :func:`skip_lower_layers` yields, ``None`` when nothing is frozen)."""
    hf = model._model
    device = next(hf.parameters()).device
    if stub is not None:
        stub.value = states[:, : sub.input_ids.shape[1]].to(device)
    return hf(input_ids=sub.input_ids.to(device), attention_mask=sub.attention_mask.to(device), use_cache=False,
              **kwargs).logits


def _rows(states, idx):
    return None if states is None else states[idx]


def cached_nll(model, scored: Scored, states: torch.Tensor | None, n_frozen: int, batch_size: int = 8) -> torch.Tensor:
    """Like :func:`lmbook.mechanisms.likelihood.token_nll`, ``[B, T-1]`` nats, but running only blocks
    ``n_frozen ..`` on cached ``states`` (from :func:`prefix_states`); plain PyTorch, so it also works
    while the model is being trained."""
    T = scored.batch.input_ids.shape[1]
    out = torch.zeros(len(scored), T - 1)
    with torch.no_grad(), skip_lower_layers(model, n_frozen) as stub:
        for idx in length_batches(scored, batch_size):
            sub = scored.batch.select(idx)
            logits = _cached_forward(model, stub if n_frozen else None, _rows(states, idx), sub)
            out[idx, : sub.input_ids.shape[1] - 1] = logits_nll(logits, sub.input_ids,
                                                               sub.attention_mask[:, 1:]).float().cpu()
    return out


def cached_last_top1(model, batch: Batch, states: torch.Tensor | None, n_frozen: int,
                     batch_size: int = 64) -> torch.Tensor:
    """Top-1 next token after each row's last token, ``[B]``, running only blocks ``n_frozen ..`` on
    cached ``states`` of ``batch`` (a :class:`lmbook.core.tokens.Batch`, as
    :func:`lmbook.experiments.recall.known_mask` encodes its prompts). Logits are computed at the last tokens only."""
    out = torch.empty(len(batch), dtype=torch.long)
    with torch.no_grad(), skip_lower_layers(model, n_frozen) as stub:
        for idx in length_batches(batch, batch_size):
            sub = batch.select(idx)
            keep = torch.unique(sub.last)
            logits = _cached_forward(model, stub if n_frozen else None, _rows(states, idx), sub,
                                     logits_to_keep=keep.to(next(model._model.parameters()).device))
            col = torch.searchsorted(keep, sub.last)
            out[idx] = logits[torch.arange(len(idx)), col.to(logits.device)].argmax(-1).cpu()
    return out


# --------------------------------------------------------------------------------------------------
# One AdamW loop


def shuffled_batches(n: int, batch_size: int, seed: int, *, epochs: int | None = None,
                     steps: int | None = None) -> list[list[int]]:
    """The order in which :func:`adamw_loop` visits ``n`` examples, as lists of row indices.

    ``epochs=e``: ``e`` passes, each a seeded permutation cut into batches of ``batch_size`` (the last
    one of a pass may be smaller). ``steps=s``: ``s`` batches of ``batch_size`` drawn from a stream of
    seeded permutations, a new one appended whenever fewer than ``batch_size`` examples are left (a
    batch may straddle two passes; with ``batch_size > n`` every batch is one whole permutation).
    Give exactly one of the two."""
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1)
    if (epochs is None) == (steps is None):
        raise ParameterError("shuffled_batches: give exactly one of epochs= and steps=")
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    if epochs is not None:
        check_int("epochs", epochs, 0)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            out += [perm[s:s + batch_size] for s in range(0, n, batch_size)]
        return out
    check_int("steps", steps, 0)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def lr_schedule(total: int, warmup: int = 0, kind: str = "constant", floor: float = 0.1) -> Callable[[int], float]:
    """The learning-rate multiplier of step ``i`` (counting from 0) of ``total``: linear warm-up from
    ``1 / (warmup + 1)`` to 1 over the first ``warmup`` steps, then ``"constant"`` (1) or ``"cosine"``
    (from 1 down to ``floor`` at the last step), the schedules of continued pretraining."""
    check_int("total", total, 0)
    check_int("warmup", warmup, 0)
    check_choice("schedule", kind, ("constant", "cosine"))
    check_float("floor", floor, 0.0, 1.0)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if kind == "constant" or total - warmup <= 1:
            return 1.0
        t = (i - warmup) / (total - warmup - 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def adamw_loop(params: Sequence[torch.nn.Parameter], batches: Sequence[list[int]],
               loss_fn: Callable[[list[int]], torch.Tensor], *, lr: float, max_grad_norm: float | None = None,
               on_step: Callable[[int], None] | None = None, desc: str = "training",
               progress: bool = True, lr_factor: Callable[[int], float] | None = None) -> list[float]:
    """The training loop of the book: one AdamW step (no weight decay) per entry of ``batches`` on the
    scalar ``loss_fn(rows)``, gradients clipped to ``max_grad_norm`` when given; ``on_step(step)``
    runs after each step (``step`` counts from 1). The learning rate is ``lr``, constant, or
    ``lr * lr_factor(i)`` at step ``i`` (from 0; see :func:`lr_schedule`). ``params`` must require
    gradients. Returns the loss of every step; the optimiser's gradients are dropped at the end."""
    from tqdm.auto import tqdm

    check_float("lr", lr, 0.0, 1.0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(total=len(batches), desc=desc, leave=False, disable=not progress)
    try:
        with torch.enable_grad():
            for rows in batches:
                if lr_factor is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr * lr_factor(len(losses))
                loss = loss_fn(rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(len(losses))
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
    return losses


# --------------------------------------------------------------------------------------------------
# Continued pretraining of the top blocks (chapter 3)


def train_top_layers(model, train: Scored, states: torch.Tensor | None, *, n_train_layers: int, lr: float,
                     epochs: int, batch_size: int = 4, seed: int = 0, max_grad_norm: float = 1.0,
                     on_step: Callable[[int], None] | None = None, desc: str = "training",
                     progress: bool = True, warmup: int = 0, schedule: str = "constant",
                     bf16: bool = False) -> list[float]:
    """Continue pretraining the top ``n_train_layers`` blocks and the final norm on the texts of
    ``train`` for ``epochs`` passes (:func:`shuffled_batches` with ``epochs``), the loss being the mean
    next-token loss of the batch's tokens; ``states`` are the lower blocks' output from
    :func:`prefix_states` with ``n_frozen = model.num_layers - n_train_layers``. Gradients are
    clipped to ``max_grad_norm``; the learning rate follows :func:`lr_schedule` (``warmup`` steps,
    then ``schedule``). ``bf16``: mixed precision, the forward and backward passes under bfloat16
    autocast while the weights and AdamW's state stay float32. The weights change in place (wrap the
    call in :func:`restore_after`) and are frozen again afterwards. Returns the loss of every step."""
    refuse_remote(model, "training the top blocks")
    check_int("epochs", epochs, 0)
    n_frozen = model.num_layers - n_train_layers
    params = top_layer_parameters(model, n_train_layers)
    batches = shuffled_batches(len(train), batch_size, seed, epochs=epochs)
    factor = lr_schedule(len(batches), warmup, schedule)

    def loss_fn(rows):
        sub = train.batch.select(rows)
        with skip_lower_layers(model, n_frozen) as stub, _autocast(model, bf16):
            logits = _cached_forward(model, stub if n_frozen else None, _rows(states, rows), sub)
        nll = logits_nll(logits, sub.input_ids, sub.attention_mask[:, 1:])
        return nll.sum() / sub.attention_mask[:, 1:].sum().to(nll.device)

    for p in params:
        p.requires_grad_(True)
    try:
        return adamw_loop(params, batches, loss_fn, lr=lr, max_grad_norm=max_grad_norm, on_step=on_step, desc=desc,
                          progress=progress, lr_factor=factor)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


# --------------------------------------------------------------------------------------------------
# Supervised fine-tuning on (prompt, reply) pairs, LoRA or whole layers (chapter 5)


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


def attach_lora(model, layers, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> _LoRA:
    """LoRA adapters on every ``nn.Linear`` inside ``layers``; returns the handle (``.parameters()``,
    ``.merge()``, ``.remove()``)."""
    layers = check_layers("layers", layers, model.num_layers)
    check_int("rank", rank, 1, 4096)
    blocks = layer_modules(model)
    linears = [m for i in layers for m in blocks[i].modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ParameterError(f"no linear modules found in layers {layers} of {type(model._model).__name__}")
    return _LoRA(linears, rank, alpha, torch.Generator().manual_seed(seed))


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]], add_special_tokens: bool = False,
                   end: str | None = None):
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
    for k, (row, lab) in enumerate(items):
        ids[k, : len(row)] = torch.tensor(row)
        labels[k, : len(lab)] = torch.tensor(lab)
        mask[k, : len(row)] = 1
    return ids, labels, mask


def _reply_loss(hf, ids, labels, mask) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens, with logits only where a label is scored."""
    hidden = hf.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, d]
    target = labels[:, 1:]
    keep = target != -100
    logits = softcap(hf, hf.get_output_embeddings()(hidden[:, :-1][keep]))
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
    on_step: Callable[[int], None] | None = None,
    keep_step: int | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on ``(prompt, reply)`` pairs for ``steps`` AdamW steps of
    ``batch_size`` pairs (:func:`shuffled_batches` with ``steps``: reshuffled every pass through the
    data), loss on the replies only, no gradient clipping.

    ``layers``: which layers to adapt (default all for LoRA); ``end``: a string appended to every
    reply (see :func:`tokenize_pairs`). LoRA adapters are merged into the weights at the end.
    ``on_step(step)`` runs after every step, with the adapters in place (to evaluate the model while
    it trains). ``keep_step``: the model keeps the weights it had after that many steps (``0``: the
    model itself) and training goes on to ``steps`` only for ``on_step`` to watch, so one run
    shows what longer training would cost.
    """
    check_choice("method", method, ("lora", "layers"))
    check_int("steps", steps, 0, 100_000)
    if keep_step is not None:
        check_int("keep_step", keep_step, 0, steps)
    check_int("batch_size", batch_size, 1, 4096)
    check_float("lr", lr, 0.0, 1.0)
    if not pairs:
        raise ParameterError("finetune needs at least one (prompt, reply) pair")
    refuse_remote(model, "fine-tuning")
    layers = check_layers("layers", layers, model.num_layers)
    if not getattr(model, "dispatched", True):
        model.dispatch()
    hf = model._model
    data = tokenize_pairs(model.tokenizer, pairs, add_special_tokens=add_special_tokens, end=end)
    pad = pad_token_id(model.tokenizer)
    if method == "lora":
        lora = attach_lora(model, layers, rank, alpha, seed)
        params = lora.parameters()
    else:
        lora = None
        blocks = layer_modules(model)
        params = _unique(p for i in layers for p in blocks[i].parameters())
        for p in params:
            p.requires_grad_(True)

    def loss_fn(rows):
        ids, labels, mask = _collate([data[i] for i in rows], pad)
        return _reply_loss(hf, ids.to(hf.device), labels.to(hf.device), mask.to(hf.device))

    kept: list[torch.Tensor] = []

    def keep(step: int) -> None:
        if keep_step is not None and step == keep_step:
            kept[:] = [p.detach().clone() for p in params]

    def after_step(step: int) -> None:
        keep(step)
        if on_step is not None:
            with torch.no_grad():
                on_step(step)

    was_training = hf.training
    hf.train(False)  # no dropout: the small models here have none anyway, and eval keeps it so
    try:
        keep(0)
        losses = adamw_loop(params, shuffled_batches(len(data), batch_size, seed, steps=steps), loss_fn, lr=lr,
                            on_step=after_step, desc=f"fine-tune ({method})", progress=progress)
        if kept:
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)
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
    refuse_remote(model, "the reply loss of a fine-tune")
    hf, tok = model._model, model.tokenizer
    data = tokenize_pairs(tok, pairs, add_special_tokens=add_special_tokens, end=end)
    pad = pad_token_id(tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids, labels, mask = _collate(data[start:start + batch_size], pad)
            n = int((labels[:, 1:] != -100).sum())
            total += float(_reply_loss(hf, ids.to(hf.device), labels.to(hf.device), mask.to(hf.device))) * n
            count += n
    return total / count
