"""Device check: the library's traces on ``device="auto"`` (a GPU where there is one).

Builds the tiny random models of tests/tiny.py, loads each with ``load_model(path, device="auto")``
and checks, on whatever device that picks, the properties the CPU unit tests check: the logit lens
at the last layer equals the model's own output, batched and looped knockout sweeps agree, causal
tracing with zero noise gives back the clean probability, patching a prompt into itself changes
nothing. Prints the device and one line per check; exits 1 on any failure.
Usage: python bench/gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny  # noqa: E402

from lmbook.causal_tracing import causal_trace  # noqa: E402
from lmbook.knockout import group_facts, knockout_sweep, knockout_sweep_looped  # noqa: E402
from lmbook.lens import logit_lens  # noqa: E402
from lmbook.models import load_model, model_device  # noqa: E402
from lmbook.patching import last_token_logprobs, patch_sweep  # noqa: E402
from lmbook.tokens import encode  # noqa: E402

PROMPTS = ["the eiffel tower is located in the city of", "michael jordan plays the sport of"]
SUBJECTS = ["eiffel tower", "michael jordan"]


def main() -> int:
    failures = 0
    root = Path(tempfile.mkdtemp())
    print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    for family in ["llama", "gemma3", "gpt2", "gptj"]:
        model = load_model(str(tiny.build(family, root / family)), device="auto", dtype=torch.float32)
        dev = model_device(model)
        b = encode(model, PROMPTS)
        checks = {}
        lens = logit_lens(model, b, targets=torch.tensor([5, 6]), k=1)
        lp = last_token_logprobs(model, b)
        checks["lens == output"] = float((lens.target_logprobs[-1, :, 0] - lp[:, [5, 6]]).abs().max())
        g = group_facts(model, PROMPTS[:1], SUBJECTS[:1], torch.tensor([10]))[0]
        checks["knockout batched == looped"] = float((knockout_sweep(model, g, window=2) - knockout_sweep_looped(model, g, window=2)).abs().max())
        r = causal_trace(model, b.select([0]), (2, 4), 10, noise=0.0, samples=2, window=2)
        checks["tracing, zero noise"] = max(abs(r.p_clean - r.p_corrupt), max(float(v.abs().max()) for v in r.effects.values()))
        p = patch_sweep(model, b.select([0]), b.select([0]))
        checks["self-patch"] = float((p[1:] - p[:1]).abs().max())
        for name, err in checks.items():
            ok = err < 1e-4
            failures += not ok
            print(f"{family:7s} on {dev}: {name:28s} max error {err:.1e} {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
