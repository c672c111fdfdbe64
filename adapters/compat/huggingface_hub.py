"""huggingface_hub internals this package relies on. Checked against huggingface_hub 2.4.0 (tests/test_compat.py).

- ``huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY``: the factory ``set_client_factory`` installed; read to
  wrap it and to put it back (the library has no public getter).
- ``httpx2``: the HTTP client huggingface_hub 2.x is built on and installs with it (a dependency of
  huggingface_hub, not declared separately in pyproject.toml); its ``Client.timeout`` takes an ``httpx2.Timeout``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def client_timeout(seconds: float | None) -> Iterator[None]:
    """huggingface_hub's shared HTTP client waits forever by default; give every request a deadline."""
    if not seconds:
        yield
        return
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    prev = _http._GLOBAL_CLIENT_FACTORY

    def factory():
        client = prev()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(prev)
