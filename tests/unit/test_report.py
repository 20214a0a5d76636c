"""Issue 10, part 4: ``pipefarm report RUN -o report.html``, one self-contained HTML file.

A real run (command tasks that succeed, fail with stderr that needs escaping, and time out) is
executed by real ``pipefarm`` processes; the report is checked for its numbers against
``pipefarm status --json``, for naming no URL, and drawn by a real headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from cli_lib import PF, ok, one_line_usage_error, pf_cli
from conftest import service_absent

from pipefarm.observe import svg

CHROMIUM = "/usr/bin/chromium"
N_OK, N_FAIL = 280, 12  # tasks 0..279 succeed, 280..291 fail; one more task times out


# --- the charts on their own -----------------------------------------------------------------------
def test_charts_are_inline_svg_and_escape_every_label() -> None:
    evil = '<script>alert("x")</script>&'
    charts = [
        svg.bars([(evil, 3), ("b", 1)], label=evil),
        svg.histogram([0.01, 0.1, 1, 10], [5, 0, 2], label=evil),
        svg.timeline([(100.0, 3), (110.0, 0), (120.0, 7)], label=evil),
        svg.gantt([(evil, [(0.0, 1.0, "failed", evil), (1.0, 3.0, "succeeded", "")])], label=evil,
                  t0=0.0, t1=3.0, colors={"failed": "#f00"}),
    ]
    for c in charts:
        assert c.startswith("<svg") and c.endswith("</svg>")
        assert "<script" not in c and "&lt;script&gt;" in c
        assert "http" not in c  # inline in HTML5: not even an xmlns
        assert c.count("<rect") >= 2
    for c in (svg.bars([], label="x"), svg.histogram([], [], label="x"), svg.timeline([], label="x"),
              svg.gantt([], label="x", t0=0, t1=1, colors={})):
        assert "nothing to show" in c


def test_ticks_and_units_are_round() -> None:
    assert svg.nice_ticks(0, 100, 5) == [0, 20, 40, 60, 80, 100]
    assert svg.nice_ticks(0, 7, 4) == [0, 2, 4, 6]
    assert svg.fmt_seconds(0.0123) == "12.3 ms"
    assert svg.fmt_seconds(90) == "90 s"
    assert svg.fmt_seconds(5400) == "90 min"
    assert svg.fmt_count(1_200_000) == "1.2M"


# --- a real run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 293 command tasks: 280 succeed, 12 fail with HTML in their stderr, 1 times out."""
    d = tmp_path_factory.mktemp("report")
    ok("submit", "r", "--array", f"0-{N_OK + N_FAIL - 1}", "--shell", "--key", "k<{index}>&",
       "--", f'if [ {{index}} -ge {N_OK} ]; then echo "step {{index}}" >&2;'
       ' echo "bad <b>input</b> & \\"quoted\\" {index}" >&2; exit 3; fi', cwd=d)
    ok("submit", "r", "--timeout", "0.5", "--", "sleep", "30", cwd=d)
    p = pf_cli("run", "r", "--no-progress", "-w", "4", cwd=d)
    assert p.returncode == 1, p.stderr  # failed tasks
    return d


def _table_counts(html: str, head: str) -> dict[str, int]:
    """``{label: n}`` from the report's table with this header (e.g. 'state')."""
    m = re.search(rf"<table><tr><th>{head}</th>.*?</table>", html)
    assert m, head
    return {k: int(v.replace(",", ""))
            for k, v in re.findall(r'<tr><td>([a-z_]+)</td><td class="n">([\d,]+)</td></tr>', m.group(0))}


def test_report_holds_the_runs_numbers_failures_and_charts(finished: Path) -> None:
    out = ok("report", "r", "-o", "rep.html", cwd=finished)
    path = finished / "rep.html"
    assert "rep.html" in out and path.is_file()
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")

    # nothing to fetch: no URL at all, no external src/href
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "default-src 'none'" in html

    status = json.loads(ok("status", "r", "--json", cwd=finished))
    assert _table_counts(html, "state") == status["counts"]
    assert status["counts"]["failed"] == N_FAIL + 1 and status["counts"]["succeeded"] == N_OK
    outcomes = _table_counts(html, "outcome")
    assert outcomes["succeeded"] == N_OK and outcomes["failed"] == N_FAIL and outcomes["timed_out"] == 1

    # charts: the state bars, throughput, a histogram per command, utilisation, the Gantt chart
    assert html.count("<svg") >= 6
    for label in ("tasks by state", "tasks ended", "busy fraction per worker", "attempts per worker"):
        assert f'aria-label="{label}"' in html, label
    assert re.search(r'aria-label="[^"]*: duration"', html)  # one histogram per name
    assert "All 293 attempts" in html

    # failure groups: the signature, the example's exit code and its stderr, escaped
    assert "exit 3: bad &lt;b&gt;input&lt;/b&gt; &amp; &quot;…&quot; N" in html or \
        "exit 3: bad &lt;b&gt;input&lt;/b&gt; &amp;" in html
    assert "<b>input</b>" not in html
    assert "bad &lt;b&gt;input&lt;/b&gt; &amp; &quot;quoted&quot; 280" in html  # the example's stderr
    assert "step 280" in html
    assert "timed out" in html
    assert "k&lt;280&gt;&amp;" in html and "k<280>" not in html  # user keys escaped


def test_default_output_is_beside_not_inside_the_run_and_stdout_works(finished: Path) -> None:
    def files() -> list[str]:  # SQLite's own -wal/-shm come and go with any reader
        return sorted(p.name for p in (finished / "r").iterdir() if "catalog.db-" not in p.name)

    before = files()
    out = ok("report", "r", cwd=finished)
    assert (finished / "r-report.html").is_file() and "r-report.html" in out
    assert files() == before  # nothing written in RUN
    text = ok("report", "r", "-o", "-", cwd=finished)
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text


def test_report_replaces_atomically_and_errors_in_one_line(tmp_path: Path, finished: Path) -> None:
    (tmp_path / "old.html").write_text("old")
    p = pf_cli("report", finished / "r", "-o", tmp_path / "nodir" / "x.html", cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    ok("report", finished / "r", "-o", tmp_path / "old.html", cwd=tmp_path)
    assert (tmp_path / "old.html").read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    one_line_usage_error(pf_cli("report", tmp_path / "no-such-run", cwd=tmp_path))


def test_report_of_an_empty_and_a_not_started_run(tmp_path: Path) -> None:
    ok("submit", "r", "--array", "0-9", "--", "true", cwd=tmp_path)
    ok("report", "r", "-o", "a.html", cwd=tmp_path)
    html = (tmp_path / "a.html").read_text()
    assert "not running: 10 task(s) left" in html
    assert _table_counts(html, "state")["ready"] == 10


def test_report_of_an_array_run_folds_its_journals_first(tmp_path: Path) -> None:
    """A shared-filesystem run whose worker journaled everything and nothing folded it yet."""
    ok("submit", "r", "--array", "0-19", "--shell", "--",
       'if [ {index} -ge 17 ]; then echo "oops {index}" >&2; exit 2; fi', cwd=tmp_path)
    ok("array", "r", "--scheduler", "slurm", "--elements", "1", "--time", "10", "--lease", "2",
       cwd=tmp_path)  # writes the script and offers the tasks; submits nothing
    subprocess.run([*PF, "worker", "r"], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                   timeout=120, check=True)
    ok("report", "r", "-o", "a.html", cwd=tmp_path)
    html = (tmp_path / "a.html").read_text()
    assert _table_counts(html, "state") == json.loads(ok("status", "r", "--json", cwd=tmp_path))["counts"]
    assert _table_counts(html, "state")["failed"] == 3
    assert "exit 2: oops N" in html and "oops 17" in html


@pytest.mark.slow
def test_report_of_a_live_run(tmp_path: Path) -> None:
    ok("submit", "r", "--array", "0-39", "--", "sleep", "0.5", cwd=tmp_path)
    bg = subprocess.Popen([*PF, "run", "r", "--no-progress", "-w", "2"], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while json.loads(ok("status", "r", "--json", cwd=tmp_path))["done"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ok("report", "r", "-o", "live.html", cwd=tmp_path)
    finally:
        bg.kill()
        bg.wait(timeout=30)
    html = (tmp_path / "live.html").read_text()
    assert "running: " in html and "task(s) left" in html
    assert "throughput (last minute)" in html
    assert 'aria-label="attempts per worker"' in html  # running attempts drawn up to now


# --- drawn by a real browser, offline --------------------------------------------------------------
def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered rows of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


@pytest.mark.slow
def test_the_report_draws_in_headless_chromium_offline(finished: Path, tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        service_absent(f"{CHROMIUM} is not installed")
    ok("report", "r", "-o", tmp_path / "rep.html", cwd=finished)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'prof'}",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",  # no network
         f"--screenshot={shot}", "--window-size=1200,2000", (tmp_path / "rep.html").as_uri()],
        capture_output=True, timeout=90, check=False)
    assert shot.is_file() and shot.stat().st_size > 0
    _width, ch, rows = _png_pixels(shot.read_bytes())
    ink = colour = 0
    for row in rows[::4]:  # every 4th row: enough to see text and charts
        for i in range(0, len(row), ch * 2):
            r, g, b = row[i], row[i + 1], row[i + 2]
            if min(r, g, b) < 200:
                ink += 1
            if max(r, g, b) - min(r, g, b) > 60:
                colour += 1  # saturated pixels: the charts' bars, not black text
    sampled = len(rows[::4]) * (len(rows[0]) // (ch * 2))
    assert ink > sampled * 0.01, (ink, sampled)  # a blank page has none
    assert colour > 500, colour  # the SVG charts were drawn
