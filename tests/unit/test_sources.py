"""Value sources for ``pipefarm submit`` (``pipefarm.sources``)."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import pytest

from pipefarm.execute.template import Command, TemplateError, placeholders
from pipefarm.sources import (
    array_size,
    array_source,
    check_template,
    checked,
    csv_source,
    file_source,
    json_source,
    source_for,
)


def indices(spec: str) -> list[int]:
    return [int(v["index"]) for v in array_source(spec)]


def test_array_source():
    assert indices("0-9999") == list(range(10000))
    assert indices("0-99:2") == list(range(0, 100, 2))
    assert indices("1,5,7") == [1, 5, 7]
    assert indices("1-3,10-20:5") == [1, 2, 3, 10, 15, 20]
    assert indices("4") == [4]
    assert list(array_source("3-4")) == [{"index": "3"}, {"index": "4"}]
    assert array_size("0-9999") == 10000 and array_size("0-99:2") == 50


@pytest.mark.parametrize("bad", ["", "a-b", "5-1", "0-9:0", "1,,x", "-3", "1-2-3"])
def test_array_source_rejects_bad_specs_at_once(bad):
    with pytest.raises(ValueError):
        array_source(bad)  # before any value is asked for


def test_array_source_is_lazy():
    first = next(array_source("0-999999999999"))
    assert first == {"index": "0"}


def test_file_source(tmp_path: Path):
    f = tmp_path / "list.txt"
    f.write_bytes(b"a.txt 1  2\n\n   \nb c\r\n  spaced  line \nlast-no-newline")
    rows = list(file_source(f))
    assert rows == [
        {"line": "a.txt 1  2", "0": "a.txt", "1": "1", "2": "2"},
        {"line": "b c", "0": "b", "1": "c"},
        {"line": "  spaced  line ", "0": "spaced", "1": "line"},
        {"line": "last-no-newline", "0": "last-no-newline"},
    ]


def test_file_source_keeps_odd_bytes(tmp_path: Path):
    f = tmp_path / "names.txt"
    f.write_bytes(b"caf\xe9.dat\nx\ry\n")
    rows = list(file_source(f))
    assert rows[0]["line"].encode("utf-8", "surrogateescape") == b"caf\xe9.dat"
    assert rows[1]["line"] == "x\ry"  # a lone CR is part of the line, not an ending


def test_csv_source(tmp_path: Path):
    f = tmp_path / "s.csv"
    f.write_text(
        'sample,reads,note\n'
        's1,100,"has, comma"\n'
        '\n'
        's2,200,"multi\nline"\n'
        's3,300,\n'
    )
    rows = list(csv_source(f))
    assert rows == [
        {"sample": "s1", "reads": "100", "note": "has, comma"},
        {"sample": "s2", "reads": "200", "note": "multi\nline"},
        {"sample": "s3", "reads": "300", "note": ""},
    ]
    assert list(source_for(f)) == rows


def test_csv_source_errors(tmp_path: Path):
    f = tmp_path / "bad.csv"
    f.write_text("a,b\n1,2,3\n")
    with pytest.raises(ValueError, match="3 cells"):
        list(csv_source(f))
    f.write_text("a,b\n1,2\n3\n")  # short rows are refused too (a missing cell is a mistake)
    with pytest.raises(ValueError, match="line 3: 1 cell but the header has 2"):
        list(csv_source(f))
    f.write_text("a,a\n1,2\n")
    with pytest.raises(ValueError, match="more than once"):
        list(csv_source(f))
    f.write_text("a,\n1,2\n")
    with pytest.raises(ValueError, match="empty column"):
        list(csv_source(f))
    f.write_text("")
    assert list(csv_source(f)) == []


def test_tsv_by_extension(tmp_path: Path):
    f = tmp_path / "s.tsv"
    f.write_text("x\ty\n1 a\t2\n")
    assert list(source_for(f)) == [{"x": "1 a", "y": "2"}]


def test_json_source_list_and_lines(tmp_path: Path):
    data = [
        {"name": "a", "n": 1, "x": 0.5, "ok": True, "none": None, "list": [1, "b"], "obj": {"k": 2}},
        {"name": "ünï", "n": -3},
    ]
    want = [
        {"name": "a", "n": "1", "x": "0.5", "ok": "true", "none": "", "list": '[1,"b"]',
         "obj": '{"k":2}'},
        {"name": "ünï", "n": "-3"},
    ]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    assert list(json_source(f)) == want
    g = tmp_path / "p.jsonl"
    g.write_text("\n".join(json.dumps(d) for d in data) + "\n\n")
    assert list(json_source(g)) == want
    assert list(source_for(g)) == want
    e = tmp_path / "e.json"
    e.write_text("  [ ]  ")
    assert list(json_source(e)) == []
    e.write_text("")
    assert list(json_source(e)) == []


def test_json_source_elements_larger_than_a_read(tmp_path: Path):
    big = "x" * 300_000
    f = tmp_path / "big.json"
    f.write_text(json.dumps([{"a": big}, {"a": "small"}, {"a": big + "y"}]))
    assert [len(r["a"]) for r in json_source(f)] == [300_000, 5, 300_001]


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"a": 1', "element 0"),
        ('[{"a": 1}, 5]', "expected an object"),
        ('[{"a": 1}', "not closed"),
        ('[{"a": 1} {"b": 2}]', "expected ','"),
        ('[{"a": 1}] x', "after the closing"),
        ('"just a string"', "list of objects"),
    ],
)
def test_json_source_errors(tmp_path: Path, text, match):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        list(json_source(f))


def _peak_while_taking(rows, n: int) -> tuple[int, list]:
    tracemalloc.start()
    try:
        got = list(itertools.islice(rows, n))
        return tracemalloc.get_traced_memory()[1], got
    finally:
        tracemalloc.stop()


def test_sources_stream_big_inputs(tmp_path: Path):
    # ~30 MB inputs; taking the first rows must not read them whole
    lines = tmp_path / "big.txt"
    with open(lines, "w") as f:
        f.write("some/path/file_0000000.dat 12345 abcdef\n" * 750_000)
    peak, got = _peak_while_taking(file_source(lines), 10)
    assert len(got) == 10 and peak < 2_000_000, peak

    csvf = tmp_path / "big.csv"
    with open(csvf, "w") as f:
        f.write("a,b,c\n" + "some/path/file_0000000.dat,12345,abcdef\n" * 750_000)
    peak, got = _peak_while_taking(csv_source(csvf), 10)
    assert len(got) == 10 and peak < 2_000_000, peak

    jsonf = tmp_path / "big.json"
    with open(jsonf, "w") as f:
        f.write("[" + ",".join(['{"a": "some/path/file_0000000.dat", "b": 12345}'] * 600_000) + "]")
    peak, got = _peak_while_taking(json_source(jsonf), 10)
    assert len(got) == 10 and peak < 2_000_000, peak


@pytest.mark.slow
def test_json_source_whole_big_list_in_bounded_memory(tmp_path: Path):
    jsonf = tmp_path / "big.json"
    with open(jsonf, "w") as f:
        f.write("[" + ",".join(f'{{"i": {i}}}' for i in range(40_000)) + "]")
    tracemalloc.start()
    try:
        count = sum(1 for _ in json_source(jsonf))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40_000 and peak < 2_000_000, peak


# -- templates against sources -----------------------------------------------------------------


def test_check_template_accepts_matching_source(tmp_path: Path):
    f = tmp_path / "l.txt"
    f.write_text("x y\n")
    cmd = Command(argv=["prog", "{0}", "--all={line}"])
    check_template(placeholders(cmd), next(file_source(f)))
    check_template(placeholders(Command(argv=["prog", "{index}"])), next(array_source("0-3")))
    check_template(set(), None)


def test_check_template_names_missing_and_available(tmp_path: Path):
    f = tmp_path / "s.csv"
    f.write_text("sample,reads\ns1,5\n")
    cmd = Command(argv=["prog", "{sample}", "{sampel}", "{index}"])
    with pytest.raises(TemplateError) as info:
        check_template(placeholders(cmd), next(csv_source(f)))
    msg = str(info.value)
    assert "{sampel}" in msg and "{index}" in msg  # what is missing
    assert "{sample}, {reads}" in msg or "{reads}, {sample}" in msg  # what there is
    assert "{sample}" not in msg.split("available")[0]


@pytest.mark.parametrize("fmt", ["array", "lines", "csv", "json"])
def test_every_source_refuses_a_placeholder_it_lacks(tmp_path: Path, fmt):
    (tmp_path / "l.txt").write_text("a b\n")
    (tmp_path / "s.csv").write_text("x,y\n1,2\n")
    (tmp_path / "s.json").write_text('[{"x": 1}]')
    rows = {
        "array": lambda: array_source("0-2"),
        "lines": lambda: file_source(tmp_path / "l.txt"),
        "csv": lambda: csv_source(tmp_path / "s.csv"),
        "json": lambda: json_source(tmp_path / "s.json"),
    }[fmt]()
    cmd = Command(shell="process {nothere}")
    with pytest.raises(TemplateError, match=r"\{nothere\}.*available"):
        check_template(placeholders(cmd), next(rows))


def test_check_template_leaves_shell_variables_to_the_shell():
    # issue 8: ${HOME} is the shell's, never a placeholder (it used to be refused with a hint)
    cmd = Command(shell="echo ${HOME} {index}")
    assert placeholders(cmd) == {"index"}
    check_template(placeholders(cmd), {"index": "0"}, cmd)


def test_check_template_empty_source():
    with pytest.raises(TemplateError, match="empty"):
        check_template({"index"}, None)


def test_checked_catches_a_later_short_row(tmp_path: Path):
    f = tmp_path / "l.txt"
    f.write_text("a 1\nb 2\nc\nd 4\n")
    rows = checked(file_source(f), {"0", "1"})
    assert next(rows)["0"] == "a"
    assert next(rows)["0"] == "b"
    with pytest.raises(TemplateError, match=r"row 3.*\{1\}"):
        next(rows)
    with pytest.raises(TemplateError):
        list(checked(iter([{"a": "1"}]), {"b"}))
