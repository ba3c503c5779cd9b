"""Committed notebooks follow the conventions: no outputs, a markdown introduction first, exactly one
``parameters`` cell of literal assignments, then a code cell (the validation)."""
import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _names(nb_path):
    return pytest.mark.parametrize("path", nb_path, ids=[p.name for p in nb_path])


def test_there_are_notebooks():
    assert any(p.name == "results.ipynb" for p in NOTEBOOKS)


@_names(NOTEBOOKS)
def test_valid_and_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {i} has outputs; clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"
    assert "papermill" not in nb.metadata, f"{path.name} is an executed papermill output, not a source notebook"


@_names(NOTEBOOKS)
def test_starts_with_markdown_explanation(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name} must start with a markdown cell"
    assert len(nb.cells[0].source.split()) >= 20, f"{path.name}: the first cell should explain the paper's claim"


def _is_literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except ValueError:
        return False


@_names(NOTEBOOKS)
def test_one_parameters_cell_of_literals(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(tagged)}"
    cell = nb.cells[tagged[0]]
    assert cell.cell_type == "code"
    tree = ast.parse(cell.source)
    assert tree.body, f"{path.name}: the parameters cell is empty"
    names = []
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign), (
            f"{path.name}: parameters cell line {stmt.lineno}: only `name = literal` assignments are allowed")
        assert len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{path.name}: parameters cell line {stmt.lineno}: assign to one plain name")
        assert _is_literal(stmt.value), (
            f"{path.name}: parameter {stmt.targets[0].id!r} is not a literal (numbers, strings, lists, dicts, None)")
        names.append(stmt.targets[0].id)
    assert len(names) == len(set(names)), f"{path.name}: a parameter is assigned twice"
    # papermill must read every parameter (it cannot parse e.g. a comment holding "=")
    import papermill

    assert list(papermill.inspect_notebook(str(path))) == names, f"{path.name}: papermill misreads the parameters"
    following = nb.cells[tagged[0] + 1:]
    assert following and following[0].cell_type == "code", (
        f"{path.name}: the cell after 'parameters' must be the code cell that validates them")


def test_literal_check_rejects_expressions():
    assert _is_literal(ast.parse("[1, -2.5, {'a': None}, 'x']", mode="eval").body)
    assert not _is_literal(ast.parse("Path('x')", mode="eval").body)
    assert not _is_literal(ast.parse("2 * n", mode="eval").body)
