"""``pipefarm watch``: the textual app driven by its pilot at 80x24 on a real run in progress,
the text view, and ``Run.watch()`` for notebooks."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_lib import PF, ok, one_line_usage_error, pf_cli

import pipefarm as pf
from pipefarm.observe.watch import RunWatch, render_text

pytest.importorskip("textual")
from pipefarm.observe.watch_tui import FailuresScreen, LogScreen, WatchApp  # noqa: E402

N = 300
FAIL_EVERY = 25  # tasks 0, 25, 50, ... fail: 12 failed tasks, one signature


def make_run(path: Path) -> None:
    with pf.Run.create(path) as run:
        run.submit_cmd(
            f"sleep 0.02; echo out {{i}}; if [ $(( {{i}} % {FAIL_EVERY} )) -eq 0 ]; then"
            " echo boom {i} >&2; exit 3; fi",
            rows=[{"i": str(i)} for i in range(N)], keys=[f"k{i}" for i in range(N)])
        run.submit_cmd("sleep 2; echo slow done", keys=["slowpoke"])


def status_counts(path: Path) -> dict[str, int]:
    return json.loads(ok("status", path, "--json", cwd=path.parent))["counts"]


def head_text(app: WatchApp) -> str:
    return str(app.query_one("#head").content)


@pytest.mark.slow
def test_watch_app_follows_a_run_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "r"
    make_run(path)
    proc = subprocess.Popen([*PF, "run", str(path), "--no-progress", "--workers", "2"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    async def drive() -> tuple[list[int], str]:
        app = WatchApp(path, interval=0.2)
        seen: list[int] = []
        async with app.run_test(size=(80, 24)) as pilot:
            deadline = time.monotonic() + 90
            while True:
                await pilot.pause(0.1)
                if app.last is not None:
                    ov = app.last["overview"]
                    seen.append(ov["done"])
                    if ov["done"] == N + 1 and not ov["live"]:
                        break
                assert time.monotonic() < deadline, "the run did not end in time"
                assert app.error is None, app.error
            await pilot.pause(0.5)  # one more refresh after the end
            final = app.last["overview"]
            assert final["counts"] == status_counts(path)
            assert f"succeeded {N + 1 - N // FAIL_EVERY:,}" in head_text(app)
            assert f"failed {N // FAIL_EVERY}" in head_text(app)
            assert "finished" in head_text(app)
            assert app.query_one("#failures").row_count == 1
            assert app.query_one("#workers").row_count >= 1
            # f: the failure groups, then l: the example's output
            await pilot.press("f")
            await pilot.pause(0.5)
            assert isinstance(app.screen, FailuresScreen)
            groups = app.screen.query_one("#groups")
            assert groups.row_count == 1
            assert "exit 3: boom N" in str(groups.get_row_at(0)[1])
            await pilot.press("l")
            await pilot.pause(0.5)
            assert isinstance(app.screen, LogScreen)
            log = "\n".join(str(x) for x in app.screen.query_one("#log").lines)
            assert "boom" in log and "out" in log
            await pilot.press("escape")
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, (FailuresScreen, LogScreen))
            svg = app.export_screenshot()
            (tmp_path / "watch.svg").write_text(svg)
            await pilot.press("q")
        return seen, svg

    try:
        seen, svg = asyncio.run(drive())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert seen == sorted(seen), "done never goes back"
    assert seen[0] < N + 1, "the app watched the run while it ran"
    assert (tmp_path / "watch.svg").stat().st_size > 1000 and "<svg" in svg


@pytest.mark.slow
def test_watch_app_log_of_a_running_task_and_quit(tmp_path: Path) -> None:
    path = tmp_path / "r"
    with pf.Run.create(path) as run:
        run.submit_cmd("echo hello from the runner; sleep 30", keys=["runner"])
    proc = subprocess.Popen([*PF, "run", str(path), "--no-progress", "--workers", "1"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    async def drive() -> None:
        app = WatchApp(path, interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            deadline = time.monotonic() + 30
            while not (app.last and app.last["running"]):
                await pilot.pause(0.1)
                assert time.monotonic() < deadline
            assert app.last["overview"]["live"]
            assert "runner" in str(app.query_one("#running").get_row_at(0)[1])
            assert "live" in head_text(app)
            app.query_one("#running").focus()
            log = ""
            while "hello from the runner" not in log:  # its output reaches the log file
                await pilot.press("l")
                await pilot.pause(0.5)
                assert isinstance(app.screen, LogScreen)
                log = "\n".join(str(x) for x in app.screen.query_one("#log").lines)
                await pilot.press("escape")
                assert time.monotonic() < deadline, log
            await pilot.press("q")
        assert not app.is_running

    try:
        asyncio.run(drive())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_watch_once_and_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "r"
    make_run(path)
    text = ok("watch", path, "--once", cwd=tmp_path)
    assert f"0/{N + 1:,} done" in text and "not running" in text
    assert "not running" in render_text(path)
    one_line_usage_error(pf_cli("watch", tmp_path / "none", cwd=tmp_path))
    one_line_usage_error(pf_cli("watch", path, "--interval", "0", cwd=tmp_path))
    assert "--interval" in ok("watch", "--help", cwd=tmp_path)


def test_run_watch_for_notebooks(tmp_path: Path) -> None:
    path = tmp_path / "r"
    with pf.Run.create(path) as run:
        run.submit_cmd("true", rows=[{"i": str(i)} for i in range(3)])
        run.execute(workers=1, progress=False)
        w = run.watch()
    assert isinstance(w, RunWatch)
    assert w.overview().counts["succeeded"] == 3
    assert w.snapshot()["overview"]["done"] == 3
    page = w._repr_html_()
    assert "<table>" in page and "succeeded" in page and ">3<" in page
