"""Sampled generation: transformers' draw over the whole vocabulary against the library's.

Chapter 4 samples its topic continuations from Gemma (262k-token vocabulary) with nucleus filtering
(``lmbook.mechanisms.generation.TopP``). Transformers' sampler draws one token per row with
``torch.multinomial`` over the whole vocabulary; ``NucleusDraw`` draws it from the kept top tokens
itself and lets transformers decode greedily. Both sample from the same distribution (unit test
``test_nucleus_draw_draws_from_the_filtered_softmax``), with different random streams, so the ids
differ; this script times them side by side, interleaved, on the same left-padded batch.

Usage: python bench/sampling.py [--threads 1] [--repeats 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LogitsProcessorList

    from lmbook.core.models import generate, load_copy, load_model
    from lmbook.core.tokens import encode, left_padded, pad_token_id
    from lmbook.mechanisms.generation import TopP, generate_ids

    model = load_copy(load_model("gemma-3-270m", device="cpu"), a.dtype)
    prompts = ["I went up to my friend and said", "The weather today is", "My favourite food is",
               "Yesterday I saw"] * 10
    batch = left_padded(model, encode(model, prompts, start=True))
    n_new, top_p = 16, 0.3

    def transformers_draw():
        kw = dict(max_new_tokens=n_new, pad_token_id=pad_token_id(model), do_sample=True, temperature=1.0,
                  top_p=1.0, top_k=0, logits_processor=LogitsProcessorList([TopP(top_p)]))
        torch.manual_seed(0)
        with torch.no_grad(), generate(model, batch, **kw):
            ids = model.generator.output.save()
        return ids[:, batch.input_ids.shape[1]:]

    def library():
        return generate_ids(model, batch, n_new, sample=True, top_p=top_p, seed=0)

    times = {"transformers": [], "library": []}
    for _ in range(a.repeats):
        for name, fn in [("transformers", transformers_draw), ("library", library)]:
            t = time.perf_counter()
            ids = fn()
            times[name].append(time.perf_counter() - t)
            assert ids.shape == (len(prompts), n_new)
    tt, tl = min(times["transformers"]), min(times["library"])
    print(f"gemma-3-270m ({a.dtype}), {len(prompts)} rows x {n_new} tokens, top_p {top_p}, {a.threads} thread(s): "
          f"transformers' draw {tt:.2f} s, library {tl:.2f} s, library/transformers {tl / tt:.2f}")


if __name__ == "__main__":
    main()
