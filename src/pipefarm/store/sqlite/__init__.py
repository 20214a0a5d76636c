"""The SQLite store (the default; one host): :mod:`.schema` is the catalog's shape,
:mod:`.store` the write side (the lease protocol), :mod:`.query` the read-only side that
status, watch and the other readers use.

The names other modules import from ``pipefarm.store.sqlite`` are re-exported here.
"""

from .query import CatalogQuery
from .schema import SCHEMA_VERSION, KeysNotUnique
from .store import INLINE_RESULT_MAX, DiskFull, SQLiteStore, StoreError, is_damage

__all__ = [
    "CatalogQuery",
    "INLINE_RESULT_MAX",
    "SCHEMA_VERSION",
    "DiskFull",
    "KeysNotUnique",
    "SQLiteStore",
    "StoreError",
    "is_damage",
]
