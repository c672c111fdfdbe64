"""Helpers every stage shares, one copy each: atomic staged writes (``atomic``), sha256 of files, folders and chat
templates (``hashing``), the process memory sampler (``memory``), dtype names (``dtypes``), the run record
(``provenance``) and the error base class (``errors``)."""
