"""The next-token loss of a training step, before and after its rewrite (chapter 3's training).

``lmbook.mechanisms.likelihood.logits_nll`` used to index the logits row by row in chunks of 16M
logits; the backward pass of each row's index filled a zero tensor the size of all the logits, and
chunks that large are fresh memory (page faults) every time. It now splits one flattened view into
chunks of 1M logits. This script times, side by side in one process on the same inputs, (a) the
previous function (kept here as the reference), (b) the library's, alone (forward + backward of the
loss on random bfloat16 logits of chapter 3's shape) and inside chapter 3's training step
(``train_top_layers`` on cached lower blocks, SmolLM2, top 8 blocks, two steps of 8 segments), and
checks that losses and gradients agree.

Usage: python bench/loss.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def previous_logits_nll(logits, input_ids, target_mask, chunk_elements: int = 1 << 24):
    """The library's function before the rewrite (the reference this script times)."""
    B, T, V = logits.shape
    tgt = input_ids[:, 1:].to(logits.device)
    step = max(1, chunk_elements // V)
    rows = []
    for b in range(B):
        for i in range(0, T - 1, step):
            z = logits[b, i:min(i + step, T - 1)].float()
            rows.append(torch.logsumexp(z, -1) - z.gather(1, tgt[b, i:i + step, None]).squeeze(1))
    nll = torch.cat(rows).view(B, T - 1) if rows else logits.new_zeros(B, max(T - 1, 0), dtype=torch.float32)
    return nll * target_mask.to(nll.device)


def best(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import lmbook.mechanisms.training as tr
    from lmbook.core.models import load_model
    from lmbook.data.corpora import build_corpus, check_corpora
    from lmbook.mechanisms.likelihood import encode_texts, logits_nll

    # (1) the loss alone: forward and backward on logits of a training batch's shape
    gen = torch.Generator().manual_seed(0)
    B, T, V = 8, 296, 49152
    x = torch.randn(B, T, V, generator=gen).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T - 1, generator=gen) > 0.1).float()

    def loss_alone(f):
        def run():
            x.grad = None
            f(x, ids, mask).sum().backward()
            return x.grad.clone()
        return run

    t_old, g_old = best(loss_alone(previous_logits_nll), a.repeats)
    t_new, g_new = best(loss_alone(logits_nll), a.repeats)
    print(f"loss alone [{B}, {T}, {V}] bf16, forward + backward: previous {t_old:.2f} s, library {t_new:.2f} s, "
          f"library/previous {t_new / t_old:.2f}; gradients max |diff| {float((g_old - g_new).abs().max()):.1e}")

    # (2) inside chapter 3's training step
    model = load_model("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    (src,) = check_corpora(["factbook"])
    corpus = build_corpus(src, train_chars=16 * 1024, test_chars=1024, max_chars=1024, seed=0)
    train = encode_texts(model, corpus.train[:16])
    n_train = 8
    states = tr.prefix_states(model, train, model.num_layers - n_train, bf16=True)

    def step_with(f):
        def run():
            tr.logits_nll = f
            try:
                with tr.restore_after(tr.top_layer_parameters(model, n_train)):
                    return tr.train_top_layers(model, train, states, n_train_layers=n_train, lr=1e-4, epochs=1,
                                               batch_size=8, bf16=True, progress=False)
            finally:
                tr.logits_nll = logits_nll
        return run

    times = {"previous": [], "library": []}
    losses = {}
    for _ in range(a.repeats):  # interleaved, so load shifts both alike
        for name, f in [("previous", previous_logits_nll), ("library", logits_nll)]:
            t, losses[name] = best(step_with(f), 1)
            times[name].append(t)
    tp, tl = min(times["previous"]), min(times["library"])
    print(f"training, 2 steps of 8 segments ({int(train.target_mask.sum())} tokens), top {n_train} blocks, bf16: "
          f"previous {tp:.2f} s, library {tl:.2f} s, library/previous {tl / tp:.2f}; "
          f"losses equal: {losses['previous'] == losses['library']}")


if __name__ == "__main__":
    main()
