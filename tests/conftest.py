import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny random checkpoint per family: ``{family: folder}``."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: tiny.build(f, root / f) for f in tiny.FAMILIES}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """Each tiny checkpoint loaded through ``load_model``, as any local model would be."""
    from lmbook.models import load_model

    return {f: load_model(str(d), device="cpu") for f, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def llama(tiny_models):
    return tiny_models["llama"]


PROMPTS = [
    "the eiffel tower is located in the city of",
    "michael jordan plays the sport of",
    "the capital of italy is",
]
