"""Row formats: detect chat / prompt_completion / alpaca / text and normalise a row to OpenAI-style turns.

Every problem of a row is listed as (field, message); the reader adds the file and line."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

from adapters.data.readers import StrictJSON, json_type

FORMATS = ("chat", "prompt_completion", "alpaca", "text")


ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


ROLES = {"system", "user", "assistant"}


def detect_format(obj: dict[str, Any]) -> str | None:
    if "messages" in obj or "conversations" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    return None


# Characters that render as nothing: Unicode's default-ignorable code points that Python does not count as
# whitespace (zero-width spaces and joiners, BOM, Hangul fillers, the combining grapheme joiner, variation selectors)
# and the braille blank. An answer made of them trains the model to answer with nothing.
_INVISIBLE = {"\u034f", "\u115f", "\u1160", "\u2800", "\u3164", "\uffa0", *map(chr, range(0xFE00, 0xFE10))}


def _invisible(ch: str) -> bool:
    return ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp")


def blank(s: str) -> str | None:
    """Why a string has nothing to show ("missing or empty", or which invisible characters it holds), else None."""
    if not s.strip():
        return "missing or empty"
    if all(map(_invisible, s)):
        codes = dict.fromkeys(f"U+{ord(c):04X}" for c in s if not c.isspace() or not c.isascii())
        return f"empty: only invisible characters ({', '.join(codes)})"
    return None


def _empty(v: Any) -> bool:
    """An optional value that counts as absent: null, NaN (pandas' missing cell) or a blank string."""
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and blank(v) is not None)


def _string(
    obj: dict[str, Any], key: str, shown: str, problems: list[tuple[str, str]], check_blank: bool = True
) -> str | None:
    """The string at ``key``; an absent key, a non-string (named with its JSON type) or a blank string is listed."""
    if key not in obj:
        problems.append((shown, "missing or empty"))
        return None
    v = obj[key]
    if not isinstance(v, str):
        problems.append((shown, f"expected a string, got {json_type(v)}"))
        return None
    why = blank(v) if check_blank else None
    if why:
        problems.append((shown, why))
        return None
    return v


def _turns(value: Any, key: str, shown: str, problems: list[tuple[str, str]]) -> tuple[list[dict[str, str]], bool]:
    """Validate a list of turns; return the normalised turns and whether aliases were used."""
    if isinstance(value, str):  # CSV / Parquet store nested lists as JSON text
        try:
            value, twice = StrictJSON().loads(value)
        except ValueError as e:
            problems.append((shown, f"not a JSON list of turns: {getattr(e, 'msg', e)}"))
            return [], False
        if twice:
            problems += [(f"{shown}{path}", f'duplicate key "{k}"') for path, k in twice]
            return [], False
    if not isinstance(value, list) or not value:
        problems.append((shown, "expected a non-empty list of turns"))
        return [], False
    out, aliased = [], False
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            problems.append((f"{shown}[{i}]", "expected an object with role and content"))
            continue
        if "role" not in t and "from" in t or "content" not in t and "value" in t:
            aliased = True
        t = {"role": t["from"], **t} if "role" not in t and "from" in t else t
        t = {"content": t["value"], **t} if "content" not in t and "value" in t else t
        if "role" not in t:
            problems.append((f"{shown}[{i}].role", "missing"))
            continue
        role = _string(t, "role", f"{shown}[{i}].role", problems, check_blank=False)  # "" is an unknown role
        if role is None:
            continue
        if role in ROLE_ALIASES:
            role, aliased = ROLE_ALIASES[role], True
        if role not in ROLES:
            problems.append((f"{shown}[{i}].role", f"unknown role {role!r} (expected one of {sorted(ROLES)})"))
            continue
        content = _string(t, "content", f"{shown}[{i}].content", problems)
        if content is None:
            continue
        out.append({"role": role, "content": content})
    return out, aliased


def _check_order(turns: list[dict[str, str]], shown: str, problems: list[tuple[str, str]]) -> None:
    body = [t for t in turns if t["role"] != "system"]
    for i, t in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if t["role"] != expected:
            problems.append((shown, f"turns must alternate user/assistant; turn {i + 1} is {t['role']!r}"))
            return
    if not body or body[-1]["role"] != "assistant":
        problems.append((shown, "no assistant turn to learn from (the last turn must be the assistant's)"))


def normalise(
    obj: dict[str, Any], data_format: str | None = None, columns: dict[str, str] | None = None
) -> tuple[list[dict[str, str]] | None, str | None, list[tuple[str, str]], bool]:
    """(messages, text, problems as (field, message), aliased). Every problem of the row is listed."""
    columns = dict(columns or {})
    shown = {canon: src for canon, src in columns.items()}
    obj = dict(obj)
    for canon, src in columns.items():
        if src in obj:
            obj[canon] = obj.pop(src)
    name = lambda k: shown.get(k, k)  # noqa: E731 - report the user's column name
    fmt = data_format or detect_format(obj)
    problems: list[tuple[str, str]] = []
    if fmt is None:
        problems.append(
            (
                "messages",
                "missing (expected 'messages', 'prompt'/'completion' or 'instruction'/'output';"
                " for plain text set data_format: text)",
            )
        )
        return None, None, problems, False
    if fmt == "text":
        text = _string(obj, "text", name("text"), problems)
        return None, text, problems, False
    if fmt == "chat":
        key = "messages" if "messages" in obj or "conversations" not in obj else "conversations"
        if key not in obj:
            problems.append((name("messages"), "missing"))
            return None, None, problems, False
        turns, aliased = _turns(obj[key], key, name(key), problems)
        if not problems:
            _check_order(turns, name(key), problems)
        return (None if problems else turns), None, problems, aliased
    if fmt == "prompt_completion":
        p, c = obj.get("prompt"), obj.get("completion")
        if isinstance(p, list) or isinstance(c, list):  # TRL's conversational prompt/completion
            pt, a1 = _turns(p, "prompt", name("prompt"), problems)
            ct, a2 = _turns(c, "completion", name("completion"), problems)
            if not problems:
                _check_order(pt + ct, name("completion"), problems)
            return (None if problems else pt + ct), None, problems, a1 or a2
        p, c = (_string(obj, k, name(k), problems) for k in ("prompt", "completion"))
        if problems:
            return None, None, problems, False
        return [{"role": "user", "content": p}, {"role": "assistant", "content": c}], None, problems, False
    if fmt == "alpaca":
        ins, out = (_string(obj, k, name(k), problems) for k in ("instruction", "output"))
        inp = obj.get("input")  # optional: absent, null or blank means no input
        if not _empty(inp) and not isinstance(inp, str):
            problems.append((name("input"), f"expected a string, got {json_type(inp)}"))
        if problems:
            return None, None, problems, False
        prompt = ins if _empty(inp) else f"{ins}\n\n{inp}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": out}], None, problems, False
    problems.append(("data_format", f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})"))
    return None, None, problems, False
