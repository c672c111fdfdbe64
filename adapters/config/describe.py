"""Help for recipe keys: every key a recipe accepts, with its type, default, a recipe's value and one line of doc.

Our keys' docs are the docstrings under the fields of adapters/config/schema.py; the libraries' come from their own
field metadata (SFTConfig, LoraConfig) or docstring (BitsAndBytesConfig). Plain text, for a terminal.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import types
import typing
from typing import Any

from adapters.config import libraries, schema
from adapters.config.loading import key_type
from adapters.config.schema import Recipe, own_keys

_WIDTH = {"name": 60, "type": 26, "default": 24, "value": 24, "doc": 100}


@functools.cache
def own_docs() -> dict[str, str]:
    """The docstring written under each field of the section dataclasses (one source of help per key)."""
    tree = ast.parse(inspect.getsource(schema))
    out: dict[str, str] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node, nxt in zip(cls.body, cls.body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    out.setdefault(node.target.id, libraries.one_line(nxt.value.value))
    return out


def type_name(tp: Any) -> str:
    """``int | None``, ``list[str]``, ``'none' | 'all'``: annotations as a user writes them."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _value(v: Any) -> str:
    if isinstance(v, enum.Enum):
        v = v.value
    return "None" if v is None else str(v) if isinstance(v, (str, int, float)) else repr(v)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _row(cells: list[str], widths: list[int]) -> str:
    return "  " + "  ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()


def _table(title: str, rows: list[tuple[str, str, str, str, str]], recipe: Recipe | None) -> list[str]:
    cols = ["name", "type", "default"] + (["value"] if recipe is not None else []) + ["doc"]
    widths = [min(_WIDTH[c], max([len(c)] + [len(r[i]) for r in rows])) for i, c in enumerate(cols[:-1])]
    widths.append(_WIDTH["doc"])
    lines = [title, _row(cols, widths)]
    for name, tp, default, value, doc in rows:
        lines.append(_row([name, tp, default] + ([value] if recipe is not None else []) + [doc], widths))
    return lines


def describe_keys(recipe: Recipe | None = None) -> str:
    """A table of every key a recipe accepts, grouped by our sections and then by library config class: name,
    type, default, the recipe's value (when a recipe is given) and one line of doc. Defaults we chose over the
    library's are marked * and their reasons listed under the table."""
    docs, own = own_docs(), own_keys()
    trainer = recipe.trainer if recipe is not None else None
    blocks: list[list[str]] = []
    for section, cls in schema.SECTIONS:
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = _value(getattr(recipe, f.name)) if recipe is not None else ""
            rows.append((f.name, type_name(key_type(f.name)), _value(default), value, docs.get(f.name, "")))
        blocks.append(_table(f"{section}", rows, recipe))
    for lib in libraries.libraries_for(trainer):
        rows, reasons = [], []
        for name, key in lib.keys().items():
            if name in lib.pipeline or name in own:
                continue
            mark = ""
            if name in lib.ours:
                mark = " *"
                reasons.append(f"  * {name}: {lib.ours[name][1]} (library default: {_value(key.default)})")
            value = _value(getattr(recipe, name)) if recipe is not None else ""
            ours = lib.ours.get(name, (None,))[0]
            default = str(ours) if isinstance(ours, libraries.OnBase) else _value(lib.default(name))
            rows.append((name, type_name(key.type), default + mark, value, key.doc))
        blocks.append(_table(f"{lib.section}: {lib.name}", rows, recipe) + reasons)
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"
