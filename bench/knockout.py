"""Benchmark: the batched attention-knockout sweep of chapter 2 against the plain way.

This is the ``attention knockout sweep`` case of ``bench/suite.py`` (chapter 2), run alone: the
same sweep (every knockout kind x a window around every layer) on the same facts three ways, side
by side in one process:

* looped (naive): one full forward per fact and intervention (``knockout_sweep_looped``);
* batched (library): one forward per group of facts, every intervention a row feeding only the
  last token against the cached prefix (``knockout_sweep``);
* plain (floor): the very same batched forward with no intervention (``last_token_run`` without
  knockouts), the floor the batched sweep can at best reach.

It checks that looped and batched agree to 1e-4 (exit status 1 if not) and prints the ratios.
Usage: python bench/knockout.py [--facts 2] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402  (bench/ is a folder of scripts, not a package)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=2, help="known facts to sweep (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats; the best is kept")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    return suite.main(["--chapter", "2", "--case", "knockout", "--facts", str(a.facts), "--repeats",
                       str(a.repeats), "--threads", str(a.threads)])


if __name__ == "__main__":
    sys.exit(main())
