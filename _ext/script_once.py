"""Each inline script of a page once.

sphinx-thebe 0.3.1 registers its configuration script (``const THEBE_JS_URL = ...``) in a way that
Sphinx 7.4 copies into every page twice, and the second copy throws ``SyntaxError: Identifier
'THEBE_JS_URL' has already been declared`` in the reader's browser (tests/browser_check.py finds
it). This drops repeated scripts from each page's context before the page is written.
"""


def _dedupe(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for s in scripts:
        attrs = {k: v for k, v in getattr(s, "attributes", {}).items() if k != "priority"}
        key = (getattr(s, "filename", str(s)) or "", repr(sorted(attrs.items())))
        if key not in seen:
            seen.add(key)
            kept.append(s)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
