"""The result cache: successful results keyed by what produced them, shared by runs.

``run.map(fn, xs, cache=True)`` looks each task up before it runs and records a hit as an
attempt with outcome ``cached``; a success is written back. Keys (:mod:`.key`) are sha256
over a canonical encoding of the task's identity and inputs; entries (:mod:`.entries`) live in
append-only, checksummed pack files in a directory that may sit on a shared filesystem.
"""

from __future__ import annotations

from .entries import CacheWarning, ResultCache
from .key import CacheKeyError, register, task

__all__ = ["CacheKeyError", "CacheWarning", "ResultCache", "register", "task"]
