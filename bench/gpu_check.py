"""Device check: the unit tests' property checks, run on ``device="auto"`` (a GPU where there is one).

The unit tests load their tiny random models through ``load_model(path, device=...)``; with
``--device auto`` every property they check (the logit lens at the last layer equals the output,
batched equals looped, zero interventions change nothing, ablation leaves the stream orthogonal,
sublayer writes add up, LoRA merges exactly, each chapter's protocol runs end to end) is checked on
whatever device that picks. There is no second suite to keep in step with the first.

``tests/test_sharded.py`` is part of that run: on a GPU machine it splits a tiny model over two
devices (two GPUs, or one GPU and the CPU) and checks that every library function that moves tensors
gives the one-device results. ``--sharded`` runs that file alone (a minute, for a short lease).

Usage: python bench/gpu_check.py [--sharded] [extra pytest arguments]
Prints the device, runs ``pytest -m "not chapters and not book" --device auto`` (with ``--sharded``:
``pytest tests/test_sharded.py --device auto``) and exits with its code; a split that cannot run
(no GPU) is reported as skipped, and with ``--sharded`` that is a failure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (the checks run on the CPU)"
    print(f"cuda available: {torch.cuda.is_available()}; device 0: {name}", flush=True)
    print(f"cuda devices: {torch.cuda.device_count()}", flush=True)
    if "--sharded" in argv:
        argv = [a for a in argv if a != "--sharded"]
        if not torch.cuda.is_available():
            print("--sharded needs a GPU: the split over two devices cannot run here", flush=True)
            return 1
        cmd = [sys.executable, "-m", "pytest", "tests/test_sharded.py", "--device", "auto", "-q", "-rs", *argv]
    else:
        cmd = [sys.executable, "-m", "pytest", "-m", "not chapters and not book", "--device", "auto", "-q", *argv]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
