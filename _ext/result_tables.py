"""Number a result table shown by a notebook cell as a table ("Table 3"), not as a figure.

A chapter shows a DataFrame as a result table by giving its cell ``metadata.mystnb.figure`` with a caption and a
``tbl-...`` name (tests/test_reader.py checks that every such cell has one). myst-nb wraps any captioned output in a
figure, so Sphinx would number it "Fig. N" beside the markdown tables numbered "Table N". This turns each
figure whose name starts with ``tbl-`` into a :class:`result_table`, a figure that Sphinx enumerates as a table:
its caption (moved above the table) and every ``{numref}`` to it then read "Table N", in the same sequence as the
markdown tables.
"""

from docutils import nodes
from sphinx.transforms import SphinxTransform


class result_table(nodes.figure):  # noqa: N801 (docutils names node classes in lower case)
    """A figure that holds a result table; enumerated as a ``table``."""


class ResultTables(SphinxTransform):
    default_priority = 500

    def apply(self, **kwargs):
        for fig in list(self.document.findall(nodes.figure)):
            if type(fig) is nodes.figure and any(i.startswith("tbl-") for i in fig["ids"]):
                fig.__class__ = result_table
                for caption in [c for c in fig.children if isinstance(c, nodes.caption)]:
                    fig.remove(caption)  # a table's caption goes above it
                    fig.insert(0, caption)


def _visit(self, node):
    self.visit_figure(node)


def _depart(self, node):
    self.depart_figure(node)


def setup(app):
    visitors = {b: (_visit, _depart) for b in ("html", "latex", "text", "man", "texinfo")}
    app.add_enumerable_node(result_table, "table", **visitors)
    app.add_transform(ResultTables)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
