"""``papermill --help-notebook chapters/<chapter>.ipynb`` lists every parameter with a type and a help line.

Papermill infers parameters from the cell tagged ``parameters``, line by line: a parameter is
``NAME: type = value  # help``, and a value over several lines carries its help on its last line.
A help comment must not contain ``=`` (papermill then skips the line), and an annotation must be a
plain name such as ``int`` or ``list``, or a quoted one such as ``"Union[str, list]"``.
"""

from __future__ import annotations

import ast
import json

import papermill as pm
import pytest

from conftest import CHAPTERS, ROOT


def _parameters_cell(stem: str) -> str:
    nb = json.loads((ROOT / "chapters" / f"{stem}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return "".join(cell["source"])


@pytest.mark.parametrize("stem", CHAPTERS)
def test_every_parameter_has_a_type_and_a_help_line(stem):
    tree = ast.parse(_parameters_cell(stem))
    assigned = []
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), (
            f"{stem}: line {node.lineno} of the parameters cell is not an annotated assignment "
            "(NAME: type = value  # help)")
        assigned.append(node.target.id)
    inferred = pm.inspect_notebook(str(ROOT / "chapters" / f"{stem}.ipynb"))
    missing = [n for n in assigned if n not in inferred]
    assert not missing, f"{stem}: papermill --help-notebook does not list {missing} (is there an '=' in a comment?)"
    untyped = [n for n in assigned if inferred[n]["inferred_type_name"] in ("None", "")]
    assert not untyped, f"{stem}: papermill shows 'Unknown type' for {untyped}"
    unexplained = [n for n in assigned if not inferred[n]["help"].strip()]
    assert not unexplained, f"{stem}: no help line for {unexplained}; add '  # one-line help' after the value"
