"""Re-read the page with the table "What the book finds" (intro.md) on every build.

The table pastes each chapter's ``finding_*`` glue values with myst-nb's cross-document glue, which is
resolved when the page is written, from the glue data the chapters left in the build folder. Sphinx only
re-reads and re-writes a page whose own source changed, so after a chapter is executed again the table
would keep the old run's values; marking the page outdated on every build makes it quote the run that
the same build renders. Re-reading one markdown page costs nothing.
"""

FINDINGS_DOCS = ("intro",)


def _outdated(app, env, added, changed, removed):
    return [d for d in FINDINGS_DOCS if d in env.found_docs and d not in added | changed]


def setup(app):
    app.connect("env-get-outdated", _outdated)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
