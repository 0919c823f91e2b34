"""lmbook: the shared library of the book. Each module holds one concept; chapters import from here."""

import warnings
from pathlib import Path

# tqdm.auto falls back to text bars in notebooks without ipywidgets; its warning about that is noise on stderr.
warnings.filterwarnings("ignore", message="IProgress not found")

PROJECT_ROOT = Path(__file__).resolve().parents[2]

from lmbook.core.params import ParameterError  # noqa: E402

__all__ = ["PROJECT_ROOT", "ParameterError"]
