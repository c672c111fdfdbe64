"""The one base class of the user's mistakes.

Every error a user can fix (a bad recipe key, a malformed data row, a run directory that is not complete, a refused
merge) derives from AdaptersError. The CLI prints its message on one line and exits 2; any other exception is a bug
in this package and keeps its traceback.
"""

from __future__ import annotations


class AdaptersError(Exception):
    """A problem the user can fix; str() names the file, line or key and says what to do."""


class PathExistsError(AdaptersError, FileExistsError):
    """A target the user named already exists (a run directory, an export folder); still a FileExistsError."""


class PathNotFoundError(AdaptersError, FileNotFoundError):
    """A file or folder the user named, or asked for, is not there; still a FileNotFoundError."""
