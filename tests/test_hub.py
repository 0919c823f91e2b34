"""The model-hub path without a network: a tiny random model saved into a hub cache under an
``org/name`` id, loaded with the hub switched off (``HF_HUB_OFFLINE=1``) through ``load_model``, and
chapter 1 run end to end with ``MODEL=org/name``.

The hub's cache location and offline switch are read when ``huggingface_hub`` is imported, so each
check runs in a fresh process (a subprocess, or papermill's kernel) with the environment set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from conftest import ROOT

HUB_ID = "lmbook-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshots


def save_to_hub_cache(folder: Path, cache: Path, repo_id: str = HUB_ID) -> Path:
    """Lay out a saved checkpoint ``folder`` as the model hub's cache does (``models--org--name``:
    the files in ``blobs/``, linked from ``snapshots/<commit>/``, and ``refs/main`` naming the commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        blob = repo / "blobs" / f"{abs(hash(f.name)):x}{f.stat().st_size:x}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return repo


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    """Environment of a process that sees only a local hub cache holding ``HUB_ID``, offline."""
    root = tmp_path_factory.mktemp("hub")
    save_to_hub_cache(tiny.build("llama", root / "src"), root / "cache")
    env = dict(os.environ, HF_HUB_CACHE=str(root / "cache"), HF_HOME=str(root / "home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", LMBOOK_REMOTE="0")
    env.pop("HF_TOKEN", None)
    return env


LOAD = f"""
import json, torch
from lmbook.core.models import check_model_name, load_model, model_depth
from lmbook.core.tokens import encode
m = load_model({HUB_ID!r}, device="cpu")
with torch.no_grad():
    logits = m._model(**encode(m, ["the capital of italy is"]).inputs()).logits
print(json.dumps({{"kind": check_model_name({HUB_ID!r}), "depth": model_depth({HUB_ID!r}), "layers": m.num_layers,
                  "name": m.lmbook_name, "probs": m.attn_probs_available, "finite": bool(logits.isfinite().all())}}))
"""


def test_hub_id_loads_from_the_local_cache_offline(hub_env):
    out = subprocess.run([sys.executable, "-c", LOAD], env=hub_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"kind": "hub", "depth": 3, "layers": 3, "name": HUB_ID, "probs": True, "finite": True}


def test_a_hub_id_missing_from_the_cache_fails_in_one_line(hub_env):
    code = "from lmbook.core.models import load_model\nload_model('lmbook-test/not-cached', device='cpu')"
    out = subprocess.run([sys.executable, "-c", code], env=hub_env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "is not in the local hub cache and the hub is switched off (HF_HUB_OFFLINE)" in out.stderr


# The chapter's own smoke parameters, in the tiny model's lower-case vocabulary (tests/tiny.py).
TOUR = {
    "MODEL": HUB_ID,
    "LENS_MODELS": [HUB_ID],
    "PROMPT": "the eiffel tower is located in the city of",
    "SUBJECT": "eiffel tower",
    "ANSWER": " paris",
    "PATCH_SOURCE": "the colosseum is located in the city of",
    "PATCH_SOURCE_SUBJECT": "colosseum",
    "PATCH_SOURCE_ANSWER": " rome",
    "FACTS": [["the eiffel tower is located in the city of", " paris"],
              ["michael jordan plays the sport of", " basketball"],
              ["the capital of italy is", " rome"]],
    "DEVICE": "cpu",
}


@pytest.mark.chapters
def test_chapter_1_runs_with_a_hub_id_offline(hub_env, tmp_path, monkeypatch):
    import papermill as pm

    for k, v in hub_env.items():  # papermill's kernel inherits this process's environment
        if os.environ.get(k) != v:
            monkeypatch.setenv(k, v)
    params = {**TOUR, "RESULTS_DIR": str(tmp_path / "results")}
    pm.execute_notebook(str(ROOT / "chapters" / "01_tour.ipynb"), str(tmp_path / "01_tour.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False, cwd=str(ROOT / "chapters"))
    results = json.loads((tmp_path / "results" / "01_tour.json").read_text())
    assert results["model"] == HUB_ID and results["n_layers"] == 3
    assert {r["model"] for r in results["lens_summary"]} == {HUB_ID}
    assert 0.0 <= results["p_answer_clean"] <= 1.0
