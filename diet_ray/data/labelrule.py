"""The label rule (``data.label``): a tiny, safe expression language evaluated column-wise.

The rule is parsed with :mod:`ast` and only a whitelist of nodes is accepted: comparisons
(``== != < <= > >= in not in``), ``and``/``or``, ``not``, column names, constants and
lists/tuples of constants. Nothing is ever passed to ``eval``. Evaluation is vectorised with
``pyarrow.compute``; a row whose referenced columns are missing (null) or not comparable
(e.g. ``rating >= 4`` on the text "abc") is reported as invalid, never silently labelled 0.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diet_ray.errors import DataError

_CMP = {
    ast.Eq: pc.equal,
    ast.NotEq: pc.not_equal,
    ast.Lt: pc.less,
    ast.LtE: pc.less_equal,
    ast.Gt: pc.greater,
    ast.GtE: pc.greater_equal,
}
_ALLOWED = "comparisons (== != < <= > >= in, not in), and, or, not, column names, constants, lists of constants"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def to_float(arr: pa.Array) -> pa.Array:
    """A column as float64; text that is not a number becomes null (per element, never a whole-column failure)."""
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
        return pc.cast(arr, pa.float64())
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    s = pc.utf8_trim_whitespace(pc.cast(arr, pa.string()))
    ok = pc.match_substring_regex(
        s, r"^([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(?i:nan|inf|infinity))$"
    )
    clean = pc.if_else(ok, s, pa.scalar(None, pa.string()))
    return pc.cast(clean, pa.float64())


def to_text(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_floating(arr.type):
        # 4.0 -> "4" so rules written against integral values match float columns too.
        f = arr.to_numpy(zero_copy_only=False)
        if np.all(np.isnan(f) | (f == np.round(f))):
            arr = pc.cast(arr, pa.int64())
    return pc.cast(arr, pa.string())


@dataclass
class LabelRule:
    """A parsed rule. ``columns`` are the raw columns it reads."""

    text: str
    tree: ast.AST
    columns: Tuple[str, ...]

    def check_columns(self, available: Sequence[str]) -> None:
        for c in self.columns:
            if c not in available:
                close = difflib.get_close_matches(c, list(available), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise DataError(
                    f"data.label '{self.text}' uses column '{c}', which the data does not have "
                    f"(columns: {', '.join(available)}).{hint} Fix data.label."
                )

    def evaluate(self, table: pa.Table) -> Tuple[np.ndarray, np.ndarray]:
        """(label bool [N], valid bool [N]); ``valid`` is False where a referenced value is null or not comparable."""
        self.check_columns(table.column_names)
        views: Dict[Tuple[str, str], pa.Array] = {}

        def view(name: str, kind: str) -> pa.Array:
            key = (name, kind)
            if key not in views:
                col = table.column(name).combine_chunks() if isinstance(table.column(name), pa.ChunkedArray) else table.column(name)
                views[key] = to_float(col) if kind == "num" else to_text(col)
            return views[key]

        result = self._eval(self.tree, view)
        n = table.num_rows
        if isinstance(result, pa.Scalar):  # a rule with no column, e.g. "1 == 1"
            res = np.full(n, bool(result.as_py()))
        else:
            res = result.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        valid = np.ones(n, dtype=bool)
        for arr in views.values():
            valid &= arr.is_valid().to_numpy(zero_copy_only=False)
        return res & valid, valid

    # ----------------------------------------------------------------- evaluation
    def _operand(self, node: ast.AST, other: ast.AST, view) -> Any:
        """A column as an Arrow array (numeric or text view, chosen by what it is compared with) or a constant."""
        if isinstance(node, ast.Name):
            kind = "num"
            if isinstance(other, ast.Constant):
                kind = "num" if _is_num(other.value) else "text"
            elif isinstance(other, (ast.List, ast.Tuple)):
                kind = "num" if all(_is_num(e.value) for e in other.elts) else "text"  # type: ignore[attr-defined]
            elif isinstance(other, ast.Name):
                kind = "num"
            return view(node.id, kind)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [e.value for e in node.elts]  # type: ignore[attr-defined]
        raise DataError(f"data.label '{self.text}': unsupported operand {ast.dump(node)}")

    def _compare(self, left: ast.AST, op: ast.cmpop, right: ast.AST, view) -> Any:
        a = self._operand(left, right, view)
        b = self._operand(right, left, view)
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(b, list):
                raise DataError(f"data.label '{self.text}': the right side of 'in' must be a list, e.g. x in ['a', 'b']")
            if not isinstance(a, pa.Array):
                raise DataError(f"data.label '{self.text}': the left side of 'in' must be a column")
            values = [str(v) if pa.types.is_string(a.type) else float(v) for v in b]
            out = pc.is_in(a, value_set=pa.array(values))
            out = pc.if_else(a.is_valid(), out, pa.scalar(None, pa.bool_()))
            return pc.invert(out) if isinstance(op, ast.NotIn) else out
        if isinstance(a, list) or isinstance(b, list):
            raise DataError(f"data.label '{self.text}': a list can only follow 'in' / 'not in'")
        fn = _CMP[type(op)]
        if isinstance(a, pa.Array) and not isinstance(b, pa.Array) and pa.types.is_floating(a.type):
            b = float(b)
        if isinstance(b, pa.Array) and not isinstance(a, pa.Array) and pa.types.is_floating(b.type):
            a = float(a)
        if not isinstance(a, pa.Array) and not isinstance(b, pa.Array):
            return pa.scalar(bool(_py_compare(a, op, b)))
        return fn(a, b)

    def _eval(self, node: ast.AST, view) -> Any:
        if isinstance(node, ast.Expression):
            return self._eval(node.body, view)
        if isinstance(node, ast.BoolOp):
            parts = [self._eval(v, view) for v in node.values]
            fn = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
            out = parts[0]
            for p in parts[1:]:
                out = fn(out, p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return pc.invert(self._eval(node.operand, view))
        if isinstance(node, ast.Compare):
            out = None
            left = node.left
            for op, right in zip(node.ops, node.comparators):  # a < b < c == (a < b) and (b < c)
                part = self._compare(left, op, right, view)
                out = part if out is None else pc.and_kleene(out, part)
                left = right
            return out
        if isinstance(node, ast.Name):  # bare column: true where non-zero
            return pc.not_equal(view(node.id, "num"), 0.0)
        if isinstance(node, ast.Constant):
            return pa.scalar(bool(node.value))
        raise DataError(f"data.label '{self.text}': unsupported expression")


def _py_compare(a: Any, op: ast.cmpop, b: Any) -> bool:
    return {
        ast.Eq: lambda: a == b,
        ast.NotEq: lambda: a != b,
        ast.Lt: lambda: a < b,
        ast.LtE: lambda: a <= b,
        ast.Gt: lambda: a > b,
        ast.GtE: lambda: a >= b,
    }[type(op)]()


def _check(node: ast.AST, rule: str, names: List[str], top: bool = True) -> None:
    """Reject every node outside the whitelist, naming it."""
    if isinstance(node, ast.Expression):
        return _check(node.body, rule, names)
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, rule, names)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _check(node.operand, rule, names)
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if not isinstance(op, tuple(_CMP) + (ast.In, ast.NotIn)):
                raise DataError(f"data.label '{rule}': operator {type(op).__name__} is not allowed; use {_ALLOWED}")
        for operand in [node.left, *node.comparators]:
            _check(operand, rule, names, top=False)
        return
    if isinstance(node, ast.Name):
        names.append(node.id)
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return
    if isinstance(node, (ast.List, ast.Tuple)) and not top:
        for e in node.elts:
            if not (isinstance(e, ast.Constant) and isinstance(e.value, (int, float, str, bool))):
                raise DataError(f"data.label '{rule}': lists may hold only constants")
        return
    raise DataError(
        f"data.label '{rule}': {type(node).__name__} is not allowed (function calls, attributes and "
        f"arithmetic are refused); use {_ALLOWED}"
    )


def parse_label_rule(rule: str) -> LabelRule:
    """Parse and whitelist-check ``rule``; a syntax error or a disallowed construct is a DataError quoting it."""
    if not rule or not rule.strip():
        raise DataError("data.label is empty; give a rule such as \"rating >= 4\" or \"behavior in ['buy']\"")
    try:
        tree = ast.parse(rule.strip(), mode="eval")
    except SyntaxError as e:
        raise DataError(f"data.label '{rule}' is not a valid rule ({e.msg}); e.g. \"rating >= 4\" or \"behavior in ['cart', 'buy']\"")
    names: List[str] = []
    _check(tree, rule, names)
    return LabelRule(rule, tree, tuple(dict.fromkeys(names)))
