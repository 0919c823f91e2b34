"""Profile of one chapter's default run: where the wall time goes.

Executes the chapter's notebook with its default parameters (``DEVICE="cpu"``, results to a
temporary folder) in a fresh Jupyter kernel through nbclient, as ``make book`` does, with two
additions injected after the parameters cell: ``torch.set_num_threads`` and a timer around
:func:`lmbook.core.models.load_model` (which :func:`lmbook.core.models.load_copy` calls too) that also
times every call of each loaded model's ``forward`` (the transformers module under nnterp: every
trace, every generation step, every plain forward) and of its top modules down to each decoder layer
(the final norm, the unembedding, each layer: the library calls these directly when it runs a model
from a middle layer or trains on cached lower-layer states), nested calls counted once, and every
``backward``. After every cell an IPython hook
records the cumulative counters, so each cell's wall time splits into

* **model load** (``load_model``, including nnterp's check trace at load);
* **model compute**: time inside the model's forward and backward passes (for nnsight traces this
  includes the interventions the trace runs inside the forward);
* **rest of the cell**: Python around the model calls, tokenisation, building prompts, nnsight
  setting up traces, tables, plotting (cells that draw are reported apart as "plotting cells");

and the run adds **kernel start** (start of the kernel until the first cell runs).

Usage: python bench/profile_chapter.py [--chapter 07_vector_arithmetic] [--threads 1] [--top 8]
       [--write] (``--write`` rewrites the profile table of bench/README.md between its markers)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- profile-table:begin -->", "<!-- profile-table:end -->"

SETUP = r'''
import time as _t, json as _json, torch as _torch
_torch.set_num_threads({threads})
import lmbook.core.models as _lm
_PROF = {{"fwd": 0.0, "bwd": 0.0, "load": 0.0, "calls": 0, "depth": 0, "cells": []}}
_orig_load = _lm.load_model

def _pre(mod, args, kwargs=None):
    _PROF["depth"] += 1
    if _PROF["depth"] == 1:
        _PROF["_t0"] = _t.perf_counter()

def _post(mod, args, out, kwargs=None):
    _PROF["depth"] -= 1
    if _PROF["depth"] == 0:
        _PROF["fwd"] += _t.perf_counter() - _PROF["_t0"]
        _PROF["calls"] += 1

_orig_backward = _torch.Tensor.backward

def _backward(self, *a, **k):
    t = _t.perf_counter()
    try:
        return _orig_backward(self, *a, **k)
    finally:
        _PROF["bwd"] += _t.perf_counter() - t

_torch.Tensor.backward = _backward

def _load(*a, **k):
    t, f = _t.perf_counter(), _PROF["fwd"]
    m = _orig_load(*a, **k)
    hf = getattr(m, "_model", None)
    if hf is not None and not getattr(hf, "_lmbook_prof", False):
        # the model, its top modules (embedding, final norm, unembedding), each decoder layer and the
        # layer's own attention and MLP: the library calls some of these directly (causal tracing from
        # a middle layer, training on cached lower-layer states); the depth count times nested calls
        # once, and always_call keeps it right when a forward stops by raising (the cached-state pass
        # stops after the frozen blocks)
        for name, mod in hf.named_modules():
            if name.count(".") <= 2 + ("layers" in name):
                mod.register_forward_pre_hook(_pre, with_kwargs=True)
                mod.register_forward_hook(_post, with_kwargs=True, always_call=True)
        hf._lmbook_prof = True
    _PROF["load"] += _t.perf_counter() - t
    _PROF["fwd"] = f  # forwards during loading count as loading
    return m

_lm.load_model = _load

def _after(result=None):
    _PROF["cells"].append((_t.perf_counter(), _PROF["fwd"], _PROF["bwd"], _PROF["load"], _PROF["calls"]))

get_ipython().events.register("post_run_cell", _after)
_PROF["t_setup"] = _t.perf_counter()
'''

DUMP = r'''
_json.dump({{k: v for k, v in _PROF.items() if not k.startswith("_")}}, open({path!r}, "w"))
'''


def run(chapter: str, threads: int, timeout: int):
    import nbformat
    from nbclient import NotebookClient

    path = next((ROOT / "chapters").glob(f"{chapter}*.ipynb"))
    nb = nbformat.read(path, as_version=4)
    tmp = Path(tempfile.mkdtemp(prefix="lmbook-profile-"))
    prof = tmp / "profile.json"
    cells = nb.cells
    at = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])) + 1
    override = nbformat.v4.new_code_cell(f"DEVICE = 'cpu'\nRESULTS_DIR = {str(tmp / 'results')!r}\n"
                                         + SETUP.format(threads=threads))
    dump = nbformat.v4.new_code_cell(DUMP.format(path=str(prof)))
    nb.cells = cells[:at] + [override] + cells[at:] + [dump]
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(ROOT)}})
    from nbclient.exceptions import CellExecutionError

    t0 = time.perf_counter()
    with client.setup_kernel():
        t_kernel = time.perf_counter() - t0
        for i, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as e:  # profile what ran (e.g. a library file edited mid-run)
                print(f"cell {i} failed, profiling the cells before it: {str(e).splitlines()[-1][:200]}")
                client.execute_cell(dump, len(nb.cells) - 1)
                break
    wall = time.perf_counter() - t0
    data = json.loads(prof.read_text())
    return path.name, nb, at, t_kernel, wall, data


def categorise(nb, at: int, t_kernel: float, wall: float, data: dict):
    """Per original code cell: wall, forward+backward, load; then the shares."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup_idx = code.index(nb.cells[at])
    marks = data["cells"]  # one per executed code cell from the setup cell on (incl. the dump's own? no: before)
    rows = []
    prev = (data["t_setup"], 0.0, 0.0, 0.0, 0)
    for j, m in enumerate(marks[1:], start=setup_idx + 1):  # marks[0] is the setup cell itself
        if j >= len(code) - 1:  # the dump cell
            break
        cell = code[j]
        d = [m[k] - prev[k] for k in range(5)]
        prev = m
        src = cell.source
        first = next((ln for ln in src.splitlines() if ln.strip() and not ln.startswith("#")), "")[:70]
        plotting = ("plt." in src or "ax." in src or ".plot(" in src) and "lmbook" not in src and "(model" not in src
        rows.append({"cell": j, "first_line": first, "wall": d[0], "model": d[1] + d[2], "load": d[3],
                     "forwards": d[4], "plotting": plotting})
    # cells before the setup cell (parameters, validation): no model yet; kernel start = setup of the kernel
    pre = 0.0
    for c in code[:setup_idx]:
        ex = c.get("metadata", {}).get("execution", {})
        if "shell.execute_reply" in ex and "iopub.execute_input" in ex:
            from datetime import datetime

            f = "%Y-%m-%dT%H:%M:%S.%fZ"
            pre += (datetime.strptime(ex["shell.execute_reply"], f)
                    - datetime.strptime(ex["iopub.execute_input"], f)).total_seconds()
    total_model = sum(r["model"] for r in rows)
    load = sum(r["load"] for r in rows)
    plot = sum(r["wall"] - r["model"] - r["load"] for r in rows if r["plotting"])
    rest = sum(r["wall"] - r["model"] - r["load"] for r in rows if not r["plotting"]) + pre
    other = max(0.0, wall - t_kernel - total_model - load - plot - rest)
    shares = [("model compute (forward + backward)", total_model), ("model load", load),
              ("rest of the library cells (Python, tokenisation, nnsight set-up)", rest),
              ("plotting cells", plot), ("kernel start", t_kernel), ("between cells (nbclient)", other)]
    return rows, shares


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chapter", default="07_vector_arithmetic", help="notebook name prefix in chapters/")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=3600, help="per cell, seconds")
    p.add_argument("--top", type=int, default=8, help="cells listed, slowest first")
    p.add_argument("--write", action="store_true", help="rewrite the profile table in bench/README.md")
    a = p.parse_args(argv)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    name, nb, at, t_kernel, wall, data = run(a.chapter, a.threads, a.timeout)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows, shares = categorise(nb, at, t_kernel, wall, data)
    lines = [f"Profile of `{name}` (default parameters, DEVICE=cpu, {a.threads} torch thread(s)): "
             f"{wall:.0f} s wall, {data['calls']} calls into the model; load average before / after "
             f"{load_before} / {load_after}; "
             f"`python bench/profile_chapter.py --chapter {a.chapter} --threads {a.threads}`.", "",
             "| where | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / wall:.0%} |" for k, v in shares]
    lines += ["", "Slowest cells (cell index among code cells; model = forward + backward time inside it):", "",
              "| cell | first line | wall s | model s | load s | model calls | model share |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["wall"])[: a.top]:
        share = r["model"] / max(1e-9, r["wall"] - r["load"])
        lines.append(f"| {r['cell']} | `{r['first_line'].replace('|', '/')}` | {r['wall']:.1f} | {r['model']:.1f} "
                     f"| {r['load']:.1f} | {r['forwards']} | {share:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        readme = ROOT / "bench" / "README.md"
        t = readme.read_text()
        if BEGIN in t and END in t:
            readme.write_text(t.split(BEGIN)[0] + BEGIN + "\n" + text + END + t.split(END, 1)[1])
            print("rewrote the profile table of bench/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
