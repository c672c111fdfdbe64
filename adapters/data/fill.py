"""Chat-template rendering without Jinja per row: render each conversation shape once, fill in the contents.

A chat template is a Jinja program; run per row it costs more than tokenizing the row. For most templates the
rendering of a conversation is fixed text around each message's content, chosen by the roles alone. ``TemplateFill``
finds that text by rendering the shape (roles, generation prompt) with two sets of marker contents: when both give
the same pieces around the markers, in order and unchanged (no case change, no escaping), the shape is fillable.

A row still goes through the real template when its content could steer the template: surrounding whitespace
(templates ``trim``), a marker character, or any string the template tests content against (``'</think>' in
content``, ``.split(...)``, ``.startswith(...)``). On top of that the caller compares the fill against the real
rendering on a sample of rows (``check``); one mismatch switches the fill off for the rest of the data.
"""

from __future__ import annotations

import re
from typing import Any

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use code points: no real text holds them
_MARK = re.compile(f"{_OPEN}([a-z])(\\d+){_CLOSE}")


def render(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def guarded_strings(template: str) -> set[str]:
    """Strings the template compares, tests, splits or searches with: content holding one may change the rendering."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return set()
    keys = {id(g.arg) for g in ast.find_all(nodes.Getitem)}  # message['content']: a key, not a test
    out: set[str] = set()
    for kind in (nodes.Compare, nodes.Call, nodes.Filter, nodes.Test):
        for node in ast.find_all(kind):
            out |= {
                c.value
                for c in node.find_all(nodes.Const)
                if isinstance(c.value, str) and c.value and id(c) not in keys
            }
    return out


class TemplateFill:
    """``render(messages, add_generation_prompt)`` equal to the tokenizer's chat template, without Jinja per row."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.enabled = bool(tok.chat_template)
        self.guarded = guarded_strings(tok.chat_template or "")
        # one search, in C, for a marker character or any guarded string
        self._steer = re.compile("|".join(re.escape(g) for g in sorted({_OPEN, _CLOSE, *self.guarded}, key=len)[::-1]))
        self._shapes: dict[tuple[tuple[str, ...], bool], list[str] | None] = {}

    def _pieces(self, roles: tuple[str, ...], agp: bool) -> list[str] | None:
        key = (roles, agp)
        if key not in self._shapes:
            self._shapes[key] = self._probe(roles, agp)
        return self._shapes[key]

    def _probe(self, roles: tuple[str, ...], agp: bool) -> list[str] | None:
        found = []
        for variant in "ab":
            msgs = [{"role": r, "content": f"{_OPEN}{variant}{i}{_CLOSE}"} for i, r in enumerate(roles)]
            try:
                text = render(self.tok, msgs, agp)
            except Exception:  # noqa: BLE001 - the real template raises its own error for this row later
                return None
            marks = [(m.group(1), int(m.group(2))) for m in _MARK.finditer(text)]
            if marks != [(variant, i) for i in range(len(roles))]:
                return None  # a content dropped, repeated, reordered or transformed: not fillable
            found.append(_MARK.split(text)[::3])
        return found[0] if found[0] == found[1] else None

    def _plain(self, s: str) -> bool:
        """No surrounding whitespace (``s == s.strip()``: str.strip removes what isspace holds), no marker, no
        guarded string."""
        return not (s[:1].isspace() or s[-1:].isspace()) and self._steer.search(s) is None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        pieces = self._pieces(tuple(m["role"] for m in messages), add_generation_prompt) if self.enabled else None
        if pieces is None or not all(self._plain(m["content"]) for m in messages):
            return render(self.tok, messages, add_generation_prompt)
        out = [pieces[0]]
        for m, after in zip(messages, pieces[1:]):
            out += (m["content"], after)
        return "".join(out)

    def check(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> bool:
        """Compare the fill with the real template on one conversation; a mismatch turns the fill off."""
        if self.enabled and self.render(messages, add_generation_prompt) != render(
            self.tok, messages, add_generation_prompt
        ):
            self.enabled = False
        return self.enabled
