"""Data: read JSONL rows with their file:line, render them with the chat template, build labels by position.

Rows are chat ``{"messages": [{"role", "content"}, …]}`` or ``{"prompt": …, "completion": …}``. Loss is on the
assistant turns (or the completion) only. Labels are built from token positions, never from token ids, so the
EOS / end-of-turn token that closes each answer is supervised even when the pad token equals EOS.
"""

from __future__ import annotations

import statistics
import weakref
from dataclasses import dataclass, field
from typing import Any

from adapters.data.rows import IGNORE_INDEX, DataError, Encoded, Row


@dataclass
class EncodeReport:
    rows: int = 0
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def summary(self, max_length: int) -> dict[str, Any]:
        ls = sorted(self.lengths) or [0]
        return {
            "rows": self.rows,
            "kept": self.kept,
            "dropped": len(self.dropped),
            "dropped_rows": self.dropped[:50],
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_share": round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0,
            "length": {
                "min": ls[0],
                "median": statistics.median(ls),
                "p95": ls[min(len(ls) - 1, int(0.95 * len(ls)))],
                "max": ls[-1],
                "max_length": max_length,
            },
        }


# ---------------------------------------------------------------------------------------------------- reading


# ---------------------------------------------------------------------------------------------------- encoding
def render(tok, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_messages(tok, messages: list[dict[str, str]], where: str = "?") -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and labels that train the assistant turns only.

    Each assistant turn's span is found by rendering the conversation up to the turn with a generation prompt, then
    up to and including the turn; both must be text prefixes of the full rendering, or the template cannot produce a
    loss mask and we refuse the row rather than guess. Where the tokenizer joins pieces cleanly (``joins_cleanly``),
    the rendering is tokenized piece by piece at those cuts: the prompt exactly as generation will tokenize it, each
    answer on its own, every string once. Otherwise each rendering is tokenized whole and must be a token prefix.
    """
    if joins_cleanly(tok):
        parts = pieces(*turn_cuts(lambda m, agp=False: render(tok, m, agp), messages, where))
        return piece_labels([_ids(tok, text) for text, _ in parts], [trained for _, trained in parts])
    full = _ids(tok, render(tok, messages))
    spans = (
        (_ids(tok, render(tok, messages[:i], add_generation_prompt=True)), _ids(tok, render(tok, messages[: i + 1])))
        for i, turn in enumerate(messages)
        if turn["role"] == "assistant"
    )
    return full, assistant_labels(full, spans, messages, where)


def assistant_labels(full: list[int], spans, messages: list[dict[str, str]], where: str) -> list[int]:
    """Labels of ``full`` that train the assistant turns only. ``spans``: per assistant turn, in order, the ids of the
    rendering up to the turn (with a generation prompt) and up to and including it; each must be a token prefix of
    ``full``."""
    labels = [IGNORE_INDEX] * len(full)
    turns = (i for i, turn in enumerate(messages) if turn["role"] == "assistant")
    for i, (start, end) in zip(turns, spans):
        if full[: len(start)] != start or full[: len(end)] != end or len(end) <= len(start):
            raise _no_mask(where, i, "token")
        labels[len(start) : len(end)] = full[len(start) : len(end)]
    return labels


def _no_mask(where: str, i: int, what: str) -> DataError:
    return DataError(
        f"{where}: messages[{i}]: the chat template does not render this turn as a {what} prefix of the "
        "conversation, so the assistant-only loss mask cannot be built"
    )


def turn_cuts(render_fn, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and, per assistant turn, the character span of its answer: from the end of the rendering up
    to the turn with a generation prompt to the end of the rendering up to and with the turn. Both renderings must be
    prefixes of the full one, and the spans in order. ``render_fn(messages, add_generation_prompt=False)``."""
    full = render_fn(messages)
    cuts: list[tuple[int, int]] = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = render_fn(messages[:i], True), render_fn(messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end)) or len(end) <= len(start):
            raise _no_mask(where, i, "text")
        if cuts and len(start) < cuts[-1][1]:
            raise _no_mask(where, i, "text")
        cuts.append((len(start), len(end)))
    return full, cuts


def pieces(full: str, cuts: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    """``full`` cut at the answers' spans: (text, trained) pieces, in order, none empty."""
    out, at = [], 0
    for a, b in cuts:
        out += [(full[at:a], False), (full[a:b], True)]
        at = b
    out.append((full[at:], False))
    return [(text, trained) for text, trained in out if text]


def piece_labels(ids: list[list[int]], trained: list[bool]) -> tuple[list[int], list[int]]:
    """The pieces' ids joined, and labels that train the trained pieces' tokens."""
    full: list[int] = []
    labels: list[int] = []
    for part, t in zip(ids, trained):
        full += part
        labels += part if t else [IGNORE_INDEX] * len(part)
    return full, labels


# Conversations on which a tokenizer must give, piece by piece, the ids it gives the whole rendering.
_PROBES = (
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, of course"},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Red 42"},
    ],
)
_JOINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def joins_cleanly(tok) -> bool:
    """Whether tokenizing a rendering at its answer cuts gives the ids of tokenizing it whole, on probe
    conversations with this tokenizer's template. Not so, e.g., where a tokenizer prefixes every string it gets with
    a space marker (SentencePiece's add_dummy_prefix) or merges across the cut: those rows keep whole-string
    tokenization and the token-prefix check."""
    if not getattr(tok, "chat_template", None):
        return False
    known = _JOINS.setdefault(tok, {})
    if tok.chat_template not in known:
        known[tok.chat_template] = _probe_joins(tok)
    return known[tok.chat_template]


def _probe_joins(tok) -> bool:
    tried = 0
    for conv in _PROBES:
        try:
            full, cuts = turn_cuts(lambda m, agp=False: render(tok, m, agp), conv, "probe")
        except Exception:  # noqa: BLE001 - a template that cannot render or mask this probe: the next one, or none
            continue
        parts = pieces(full, cuts)
        if piece_labels([_ids(tok, t) for t, _ in parts], [x for _, x in parts])[0] != _ids(tok, full):
            return False
        tried += 1
    return tried > 0


def encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """Plain text: BOS (untrained) + text + EOS, every token after BOS trained."""
    ids = _ids(tok, text) + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    labels = list(ids)
    if tok.bos_token_id is not None:
        ids, labels = [tok.bos_token_id] + ids, [IGNORE_INDEX] + labels
    return ids, labels


def encode_rows(
    tok, rows: list[Row], max_length: int, max_drop_share: float = 0.5
) -> tuple[list[Encoded], EncodeReport]:
    """Encode rows; a row whose trained tokens would be cut by ``max_length`` is dropped and reported.

    Raises when more than ``max_drop_share`` of the rows would be dropped: that is a recipe error, not noise.
    """
    report = EncodeReport()
    out: list[Encoded] = []
    for row in rows:
        report.rows += 1
        ids, labels = (
            encode_text(tok, row.text) if row.text is not None else encode_messages(tok, row.messages, row.where)
        )
        report.lengths.append(len(ids))
        if len(ids) > max_length:
            report.dropped.append(
                {
                    "where": row.where,
                    "tokens": len(ids),
                    "reason": f"longer than max_length={max_length}; the answer would be cut",
                }
            )
            continue
        trained = sum(1 for x in labels if x != IGNORE_INDEX)
        if trained == 0:
            report.dropped.append({"where": row.where, "tokens": len(ids), "reason": "no trained token"})
            continue
        out.append(Encoded(ids, labels, row.where))
        report.kept += 1
        report.tokens += len(ids)
        report.trained_tokens += trained
    if report.rows and len(report.dropped) > max_drop_share * report.rows:
        first = report.dropped[0]
        raise DataError(
            f"{first['where']}: {len(report.dropped)} of {report.rows} rows would be dropped "
            f"(first: {first['reason']}); raise max_length or shorten the data"
        )
    return out, report


def to_dataset(encoded, pack_length: int | None = None):
    """A datasets.Dataset of input_ids/labels; with ``pack_length``, packed by TRL (best fit decreasing).
    ``encoded``: a list of Encoded, or prepare_data's EncodedSet, whose Arrow dataset is passed on as it is."""
    from datasets import Dataset

    if hasattr(encoded, "dataset"):
        ds = encoded.dataset.select_columns(["input_ids", "labels"])
    else:
        ds = Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]})
    if pack_length:
        from trl import pack_dataset

        ds = pack_dataset(ds, pack_length, strategy="bfd")
    return ds


def prompts_and_answers(rows: list[Row]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """For scoring: the conversation up to the last assistant turn, and that turn's text."""
    return [r.messages[:-1] for r in rows], [r.messages[-1]["content"] for r in rows]
