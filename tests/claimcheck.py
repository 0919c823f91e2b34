"""Smoke assertions shared by the chapter tests: every claim a chapter recorded has a computed outcome, its
recorded and glued sentence is the one that outcome selects, and the chapter's markdown quotes exactly the
claims it recorded (see lmbook.core.claims)."""

from __future__ import annotations

import json
import re

GLUE = re.compile(r"\{glue(?::\w*)?\}`(claim_\w+)`")


def glued_outputs(notebook) -> dict[str, str]:
    """``{key: text/plain}`` of every value glued in an executed notebook (the last one, if glued twice)."""
    out = {}
    for cell in json.loads(notebook.read_text())["cells"]:
        for o in cell.get("outputs", []):
            meta = o.get("metadata", {}).get("scrapbook")
            if meta:
                prefix = meta.get("mime_prefix", "")
                out[meta["name"]] = o["data"][prefix + "text/plain"]
    return out


def assert_claims(run) -> dict:
    """Check the claims of a :class:`conftest.SmokeRun`; returns them."""
    claims = run.results.get("claims")
    assert claims, "the chapter records no claims"
    glued = glued_outputs(run.notebook)
    for name, c in claims.items():
        assert c["outcome"] in c["sentences"], f"{name}: outcome {c['outcome']!r} has no sentence"
        assert c["sentence"] == c["sentences"][c["outcome"]], f"{name}: the sentence is not the outcome's"
        assert run.results[name] == c["sentence"], f"{name}: recorded sentence differs"
        assert glued.get(name) == c["sentence"], f"{name}: glued {glued.get(name)!r}, outcome selects {c['sentence']!r}"
    nb = json.loads(run.notebook.read_text())
    markdown = ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "markdown"]
    quoted = {m for text in markdown for m in GLUE.findall(text)}
    assert quoted == set(claims), f"quoted but not recorded: {sorted(quoted - set(claims))}; " \
                                  f"recorded but not quoted: {sorted(set(claims) - quoted)}"
    return claims
