"""Benchmark: the batched attention-knockout sweep of chapter 2 against the plain way.

Runs the same sweep (every knockout kind x a window around every layer) on the same facts three ways,
side by side in one process:

* looped:  one full forward per fact and intervention (``knockout_sweep_looped``);
* batched: one forward per group of facts, every intervention a row feeding only the last token
           against the cached prefix (``knockout_sweep``);
* plain:   the very same batched forward with no intervention (``last_token_run`` without knockouts),
           the floor the batched sweep can at best reach.

It checks that looped and batched agree to 1e-4 (exit status 1 if not) and prints the ratios.
Usage: python bench/knockout.py [--model smollm2-135m-instruct] [--facts 4] [--window 9] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lmbook.core.models import load_model
from lmbook.data.facts import answer_token_ids, load_facts
from lmbook.experiments.recall import known_mask
from lmbook.mechanisms.knockout import (KINDS, _plan, group_facts, knockout_sweep, knockout_sweep_looped,
                                        last_token_run, layer_windows)


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--facts", type=int, default=4, help="known facts to sweep (default 4)")
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is kept")
    a = p.parse_args(argv)

    model = load_model(a.model, device="cpu")
    facts = load_facts()
    known = known_mask(model, facts)
    chosen = [f for f, k in zip(facts, known.tolist()) if k][: a.facts]
    groups = group_facts(model, [f.prompt for f in chosen], [f.subject for f in chosen],
                         answer_token_ids(model, chosen))
    windows = layer_windows(model.num_layers, a.window)
    n_int = len(chosen) * len(KINDS) * len(windows)
    print(f"{a.model}: {len(chosen)} facts x {len(KINDS)} kinds x {len(windows)} windows = {n_int} interventions "
          f"(+{len(chosen)} clean runs), torch threads={torch.get_num_threads()}")

    def batched():
        return [knockout_sweep(model, g, KINDS, windows) for g in groups]

    def looped():
        return [knockout_sweep_looped(model, g, KINDS, windows) for g in groups]

    def plain():
        outs = []
        for g in groups:
            keep, _ = _plan(model, g, KINDS, windows)
            outs.append(last_token_run(model, g, None, None, keep.shape[1])[0])
        return outs

    batched()  # warm-up
    t_batched, res_b = best_of(batched, a.repeats)
    t_plain, _ = best_of(plain, a.repeats)
    t_looped, res_l = best_of(looped, max(1, a.repeats // 3))
    diff = max(float((b - l).abs().max()) for b, l in zip(res_b, res_l))
    print(f"looped  (one forward per intervention): {t_looped:8.3f} s")
    print(f"batched (one forward per group of facts): {t_batched:8.3f} s")
    print(f"plain   (same batched inputs, no knockout): {t_plain:8.3f} s")
    print(f"max |batched - looped| = {diff:.2e} (must be < 1e-4)")
    print(f"speed-up batched vs looped: {t_looped / t_batched:.1f}x")
    print(f"batched / plain: {t_batched / t_plain:.2f}x")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
