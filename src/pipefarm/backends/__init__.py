"""Backends start workers and feed them: ``local`` processes, ``sequential`` in-process."""

from __future__ import annotations

from typing import Any

BACKENDS = ("local", "sequential")


def make_backend(backend: str | Any, workers: int | None = None, **options: Any) -> Any:
    """A backend object from its name, or ``backend`` itself if it is one already."""
    if not isinstance(backend, str):
        return backend
    if backend == "local":
        from .local import LocalBackend

        return LocalBackend(workers, **options)
    if backend == "sequential":
        from .sequential import SequentialBackend

        return SequentialBackend(**options)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def __getattr__(name: str) -> Any:
    if name in ("Local", "LocalBackend"):
        from .local import LocalBackend

        return LocalBackend
    if name in ("Sequential", "SequentialBackend"):
        from .sequential import SequentialBackend

        return SequentialBackend
    raise AttributeError(name)
