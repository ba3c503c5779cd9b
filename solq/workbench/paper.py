"""The SOLQ paper's tables as data, for laying our numbers beside the paper's.

``paper_tables.json`` (shipped in this package) holds each table of the paper as ``columns`` and
``rows`` (AP values in percent, ``null`` where the value is not legible), plus a ``_caption``::

    t = paper_table("table3b_vector_loss_weight")
    t.columns          # ('lambda_vec', 'seg', 'seg_50', ...)
    t.row_where(lambda_vec=3)["seg"]   # 29.7
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["PaperTable", "load_paper_tables", "paper_table", "same_value"]


def same_value(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` denote the same table entry: numbers compared numerically
    (``1``, ``1.0`` and ``"1.0"`` agree), everything else as text. ``None`` matches nothing."""
    if a is None or b is None:
        return False
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return math.isclose(fa, fb, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper: ``columns`` names, ``rows`` tuples in the paper's order."""

    key: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple, ...]

    def records(self) -> list[dict]:
        """The rows as dicts column -> value, in the paper's order."""
        return [dict(zip(self.columns, row)) for row in self.rows]

    def select(self, **allowed: Any) -> list[dict]:
        """Rows whose column values are among ``allowed[column]`` (a value or a list of values)."""
        for col in allowed:
            if col not in self.columns:
                raise KeyError(f"paper table {self.key!r} has no column {col!r}; columns: {list(self.columns)}")
        out = []
        for rec in self.records():
            ok = True
            for col, values in allowed.items():
                values = values if isinstance(values, (list, tuple)) else [values]
                ok &= any(same_value(rec[col], v) for v in values)
            if ok:
                out.append(rec)
        return out

    def row_where(self, **match: Any) -> dict | None:
        """The first row matching every ``column=value`` pair, or None."""
        rows = self.select(**match)
        return rows[0] if rows else None


@lru_cache(maxsize=4)
def _load(path: str | None) -> dict[str, PaperTable]:
    if path is None:
        text = resources.files("solq.workbench").joinpath("paper_tables.json").read_text()
        where = "solq/workbench/paper_tables.json"
    else:
        text, where = Path(path).read_text(), path
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    tables = {}
    for key, t in raw.items():
        if key.startswith("_"):
            continue
        columns = tuple(t["columns"])
        for i, row in enumerate(t["rows"]):
            if len(row) != len(columns):
                raise ValueError(f"{where}: {key} row {i} has {len(row)} values for {len(columns)} columns")
        tables[key] = PaperTable(key, t.get("_caption", ""), columns, tuple(tuple(r) for r in t["rows"]))
    return tables


def load_paper_tables(path: str | Path | None = None) -> dict[str, PaperTable]:
    """All tables of ``paper_tables.json`` (the shipped copy unless ``path`` is given), by key."""
    return dict(_load(None if path is None else str(path)))


def paper_table(key: str) -> PaperTable:
    """The paper table ``key`` (e.g. ``"table3b_vector_loss_weight"``); KeyError lists the keys."""
    tables = _load(None)
    if key not in tables:
        raise KeyError(f"no paper table {key!r}; known tables: {sorted(tables)}")
    return tables[key]
