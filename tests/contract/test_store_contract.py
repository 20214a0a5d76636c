"""The store contract (tests/store_contract.py) run against :class:`SQLiteStore`."""

from __future__ import annotations

from store_contract import ContractExamples, contract_for

from pipefarm.store.sqlite import SQLiteStore

LEASE_S = 10.0


def make_store(path: str) -> SQLiteStore:
    """A store in a fresh run directory (the suite makes and removes one per example)."""
    return SQLiteStore(path, lease_s=LEASE_S)


def make_quick_store(path: str) -> SQLiteStore:
    """The same, without an fsync per commit (WAL + NORMAL): thousands of short-lived stores
    per run of the property suite, whose subject is the protocol, not power-loss durability."""
    return SQLiteStore(path, lease_s=LEASE_S, synchronous="NORMAL")


# property-based: random interleavings of the lease protocol against a model
TestSQLiteContract = contract_for(make_quick_store, name="SQLiteContract")


class TestSQLiteExamples(ContractExamples):
    make_store = staticmethod(make_store)


class TestSQLiteInMemory(ContractExamples):
    make_store = staticmethod(lambda path: SQLiteStore(":memory:", lease_s=LEASE_S))


# --- the shared-filesystem store (store/shared_fs/): the same contract -----------------------------
from pipefarm.store.shared_fs import FsJournalStore  # noqa: E402


def make_fs_store(path: str) -> FsJournalStore:
    """A shared-filesystem store (journals + claim files, folded into a catalog) in ``path``."""
    return FsJournalStore(path, lease_s=LEASE_S, synchronous="OFF")


TestFsJournalContract = contract_for(make_fs_store, name="FsJournalContract")


class TestFsJournalExamples(ContractExamples):
    make_store = staticmethod(make_fs_store)
