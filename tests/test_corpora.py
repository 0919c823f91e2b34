"""Unit tests of lmbook.data.corpora (chapter 3): splitting by document, segments, sampling, and the
validation of CORPORA."""

import pytest

from lmbook import ParameterError
from lmbook.data.corpora import (
    BUILTIN_CORPORA,
    build_corpus,
    check_corpora,
    corpus_table,
    load_documents,
    sample_segments,
    segment_text,
    split_documents,
)


def test_segments_concatenate_back_to_the_document():
    text = "line one\n" * 30 + "x" * 100 + " a very long line " * 20 + "\n\nend"
    segs = segment_text(text, 64)
    assert all(len(s) <= 64 for s in segs)
    assert "".join(segs) == text  # no whitespace-only pieces in this text
    assert segment_text("  \n\n  ", 64) == []


def test_split_by_document_is_deterministic_and_stable():
    names = [f"doc{i}" for i in range(200)]
    train, test = split_documents(names, 0.2)
    assert 20 <= len(test) <= 60 and not set(train) & set(test) and set(train) | set(test) == set(names)
    assert split_documents(list(reversed(names)), 0.2)[1] == list(reversed(test))
    # a document's split does not depend on the other documents
    train2, test2 = split_documents(names + [f"new{i}" for i in range(50)], 0.2)
    assert set(test) <= set(test2) and set(train) <= set(train2)
    # a split that would be empty still gets one document
    assert split_documents(["a", "b"], 0.0)[1] and split_documents(["a", "b"], 1.0)[0]


def test_sample_segments_respects_the_budget():
    segs = [(f"d{i}", "x" * 10) for i in range(20)]
    a = sample_segments(segs, 55, seed=0)
    assert len(a) == 5 and a == sample_segments(segs, 55, seed=0)
    assert sample_segments(segs, 1, seed=0) and len(sample_segments(segs, 1, seed=0)) == 1


def test_build_corpus_segments_come_from_their_split(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" + "some words on a line\n" * 20)
    src, = check_corpora([str(tmp_path)])
    c = build_corpus(src, train_chars=300, test_chars=200, max_chars=64, test_fraction=0.25, seed=0)
    docs = load_documents(src)
    assert c.train and c.test and not set(c.train_docs) & set(c.test_docs)
    assert all(any(s in docs[d] for d in c.train_docs) for s in c.train)
    assert all(any(s in docs[d] for d in c.test_docs) for s in c.test)
    assert sum(map(len, c.train)) <= 300 and sum(map(len, c.test)) <= 200
    # each segment knows its document, which the chapter's intervals resample
    assert len(c.train_sources) == len(c.train) and len(c.test_sources) == len(c.test)
    assert all(s in docs[d] and d in c.test_docs for s, d in zip(c.test, c.test_sources))
    assert all(s in docs[d] and d in c.train_docs for s, d in zip(c.train, c.train_sources))
    table = corpus_table([c])
    assert table.loc[0, "corpus"] == tmp_path.name and table.loc[0, "sha256"] == c.sha256
    assert table.loc[0, "test characters"] == sum(map(len, c.test))


def test_bad_corpora_fail_with_clear_messages(tmp_path):
    with pytest.raises(ParameterError, match="built-in corpora.*encyclopedia"):
        check_corpora(["no-such-corpus"])
    with pytest.raises(ParameterError, match="CORPORA must be"):
        check_corpora("encyclopedia")
    with pytest.raises(ParameterError, match="empty"):
        check_corpora([])
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(ParameterError, match="holds 1 non-empty .txt"):
        check_corpora([str(tmp_path)])
    (tmp_path / "two.txt").write_text("a second document")
    srcs = check_corpora(["encyclopedia", str(tmp_path)])
    assert [s.name for s in srcs] == ["encyclopedia", tmp_path.name]
    assert srcs[1].load() == {"one.txt": "just one document", "two.txt": "a second document"}
    with pytest.raises(ParameterError, match="already listed"):
        check_corpora(["encyclopedia", "encyclopedia"])


def test_licence_corpus_keeps_each_licence_once():
    from lmbook.data.corpora import _licence_key, _normalise, _pinned_packages

    mit = "Permission is hereby granted, free of charge, to any person obtaining a copy\nof this software.\n"
    a = "Copyright (c) 2020 Alice\n\n" + mit
    b = "The copyright holder is Bob, 2024.\n" + mit.upper().replace(",", " ,")
    assert _licence_key(a) == _licence_key(b)  # only the copyright line, case and punctuation differ
    assert _licence_key(a) != _licence_key(a + "Additional clause.\n")
    docs = load_documents(BUILTIN_CORPORA["licences"])
    assert len(docs) >= 3 and all(t.strip() for t in docs.values())
    assert len({_licence_key(t) for t in docs.values()}) == len(docs)
    assert all(".dist-info/" in name for name in docs)
    # only the listed distributions: a package installed by hand, or a tool pinned later, does not change it
    pinned = _pinned_packages()
    assert pinned and "torch" in pinned and "pip" not in pinned and "ruff" not in pinned
    assert all(_normalise(n.split(".dist-info/")[0].rsplit("-", 1)[0]) in pinned for n in docs)


def test_licence_distributions_are_all_pinned():
    """Every distribution the licence corpus reads is installed by set-up (pinned in constraints.txt),
    so the corpus is the same on every machine that runs `make`."""
    from lmbook import PROJECT_ROOT
    from lmbook.data.corpora import _normalise, _pinned_packages

    lines = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    pins = {_normalise(ln.split("==")[0]) for ln in lines if "==" in ln and not ln.startswith("#")}
    missing = sorted(_pinned_packages() - pins)
    assert not missing, f"listed in data/corpora/licences/distributions.txt but not pinned: {missing}"


def test_factbook_corpus_is_plain_prose():
    from lmbook.data.corpora import BUILTIN_CORPORA

    docs = load_documents(BUILTIN_CORPORA["factbook"])
    assert len(docs) > 200  # one background per country or territory
    text = "".join(docs.values())
    assert "<" not in text and "&rsquo;" not in text and "&amp;" not in text  # markup and entities decoded
    assert all(t.endswith("\n") and t.strip() for t in docs.values())
