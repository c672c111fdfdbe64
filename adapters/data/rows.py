"""What the data stage passes around: rows with their location, problems, encoded rows, and the one error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.utils.errors import AdaptersError

IGNORE_INDEX = -100


class DataError(AdaptersError, ValueError):
    """Bad input data. ``str()`` starts with ``file:line[:col]: field:``."""


@dataclass
class Row:
    file: str
    line: int
    messages: list[dict[str, str]]
    text: str | None = None
    """Plain-text rows (data_format: text) have no messages and train on every token."""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str


@dataclass
class Problem:
    """A problem of a row (``file:line[:col]: field: message``) or, with ``line`` None, of a whole source
    (``FILE: no rows``), which --skip-invalid cannot set aside."""

    file: str
    line: int | None
    field: str | None
    message: str
    col: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        where = f"{self.file}:{self.line}" + (f":{self.col}" if self.col else "")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


@dataclass
class Record:
    """One raw row: its location, the parsed object (None when unparsable) and its raw text for quarantine."""

    file: str
    line: int
    obj: dict[str, Any] | None
    raw: str
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Scan:
    rows: list = field(default_factory=list)  # list[data.Row]
    problems: list[Problem] = field(default_factory=list)
    bad: list[Record] = field(default_factory=list)
    aliased: int = 0
    records: int = 0
    valid: int = 0
