"""A catalog written before the added columns (schema.ADDED_COLUMNS) gets them when a newer
pipefarm opens it for writing, keeps its tasks, and resumes."""

import sqlite3

import msgspec

import pipefarm as pf
from pipefarm.store.sqlite import schema
from pipefarm.task import Spec, spec_options_blob, spec_options_of


def _double(x):
    return 2 * x


def test_old_catalog_gains_the_added_columns_and_resumes(tmp_path):
    run = pf.Run.create(tmp_path / "r")
    run.map(_double, range(5))
    run.close()
    db = sqlite3.connect(tmp_path / "r" / "catalog.db")
    for table, column, _ in schema.ADDED_COLUMNS:  # as an older pipefarm wrote it
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.commit()
    db.close()

    run = pf.Run.open(tmp_path / "r")
    run.execute(workers=2, progress=False)
    assert [run.result(t) for t in range(1, 6)] == [0, 2, 4, 6, 8]
    for table, column, _ in schema.ADDED_COLUMNS:
        assert column in schema.columns(run.store.db, table)
    run.close()


def test_spec_options_round_trip_and_skip_unknown_fields():
    spec = Spec(kind="py", payload=b"x")
    assert spec_options_blob(spec) is None  # nothing newer than the columns: no blob
    newer = msgspec.msgpack.encode({"a_field_from_a_newer_pipefarm": 1})
    assert spec_options_of(newer) == {}
