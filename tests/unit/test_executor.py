"""``pf.Executor`` against the standard library's own expectations for executors.

Cases are ported from CPython's ``Lib/test/test_concurrent_futures`` (executor, map, wait,
as_completed, shutdown and process-pool tests), shortened in time. Each ported case runs on
``pf.Executor`` and, as the reference that proves the expectation itself, on
``concurrent.futures.ProcessPoolExecutor``.
"""

from __future__ import annotations

import concurrent.futures as cf
import operator
import os
import time

import pytest
import tasks_lib as T

import pipefarm as pf

EXECUTORS = {"pipefarm": pf.Executor, "stdlib": cf.ProcessPoolExecutor}


@pytest.fixture(params=list(EXECUTORS))
def executor_type(request):
    return EXECUTORS[request.param]


@pytest.fixture
def executor(executor_type):
    ex = executor_type(max_workers=2)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def _pf_only(executor_type):
    return executor_type is pf.Executor


# futures in fixed states, as in CPython's test_concurrent_futures/util.py
def _future(state, result=None, exception=None):
    f = cf.Future()
    f._state = state
    f._result = result
    f._exception = exception
    return f


def _fixed():
    return {
        "cancelled_only": _future(cf._base.CANCELLED),  # cancelled, waiters not yet notified
        "cancelled": _future(cf._base.CANCELLED_AND_NOTIFIED),
        "exception": _future(cf._base.FINISHED, exception=OSError()),
        "successful": _future(cf._base.FINISHED, result=42),
    }


def _capture(*args, **kwargs):
    return args, kwargs


def _sleep_and_raise(t):
    time.sleep(t)
    raise Exception("this is an exception")


# --- ExecutorTest ----------------------------------------------------------------------------------
def test_submit(executor):
    future = executor.submit(pow, 2, 8)
    assert future.result() == 256


def test_submit_keyword(executor):
    future = executor.submit(operator.mul, 2, 8)
    assert future.result() == 16
    future = executor.submit(_capture, 1, self=2, fn=3)
    assert future.result() == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=_capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)
    assert executor.submit(T.add, 1, b=2, c=3).result() == 6


def test_map(executor):
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == list(
        map(pow, range(10), range(10)))
    assert list(executor.map(T.square, range(500))) == [x * x for x in range(500)]


def test_map_exception(executor):
    i = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert i.__next__() == (0, 1)
    assert i.__next__() == (0, 1)
    with pytest.raises(ZeroDivisionError):
        i.__next__()


@pytest.mark.slow
def test_map_timeout(executor):
    results = []
    with pytest.raises(TimeoutError):
        for i in executor.map(time.sleep, [0, 0, 2.5], timeout=1.0):
            results.append(i)
    assert results == [None, None]


def test_exceptions_keep_their_type(executor):
    with pytest.raises(ZeroDivisionError):
        executor.submit(divmod, 1, 0).result()
    f = executor.submit(T.explode_with, 5)
    exc = f.exception(timeout=30)
    assert type(exc) is T.Boom and str(exc) == "explode_with got 5"
    with pytest.raises(T.Boom, match="explode_with got 5"):
        f.result()


def test_lambda_and_closure(executor, executor_type):
    if not _pf_only(executor_type):
        pytest.skip("ProcessPoolExecutor cannot pickle lambdas; pf.Executor uses cloudpickle")
    k = 10
    assert executor.submit(lambda x: x + k, 1).result() == 11

    def make_adder(n):
        def adder(x):
            return x + n
        return adder

    assert list(executor.map(make_adder(5), range(4))) == [5, 6, 7, 8]
    assert list(executor.map(lambda x, y: x * y, [1, 2, 3], [4, 5, 6])) == [4, 10, 18]


def test_max_workers_negative(executor_type):
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            executor_type(max_workers=number)


def test_run_after_shutdown(executor_type):
    ex = executor_type(max_workers=1)
    assert ex.submit(pow, 2, 5).result() == 32
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 5)
    never = executor_type(max_workers=1)  # shut down before anything ran
    never.shutdown()
    with pytest.raises(RuntimeError):
        never.submit(pow, 2, 5)


def test_context_manager_shutdown(executor_type):
    before = set(T.own_descendants(os.getpid()))
    with executor_type(max_workers=3) as e:
        assert list(e.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        workers = [p for p in T.own_descendants(os.getpid()) if p not in before]
        assert workers
    # leaving the block shut the executor down and its processes ended
    T.wait_until(lambda: not [p for p in workers if T.is_alive(p)], 10,
                 what="executor processes to end")
    with pytest.raises(RuntimeError):
        e.submit(pow, 2, 2)


@pytest.mark.slow
def test_shutdown_wait_true_runs_everything(executor_type):
    ex = executor_type(max_workers=2)
    fs = [ex.submit(T.sleep_then, i, 0.2) for i in range(6)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == list(range(6))


@pytest.mark.slow
def test_shutdown_no_wait(executor_type):
    ex = executor_type(max_workers=2)
    fs = [ex.submit(T.sleep_then, i, 0.1) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in fs] == list(range(4))


def test_cancel_futures(executor_type):
    ex = executor_type(max_workers=3)
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    # We can't guarantee the exact number of cancellations, but we can guarantee that *some*
    # were cancelled. (CPython asserts >= 35 with max_workers=3.)
    cancelled = [fut for fut in fs if fut.cancelled()]
    assert len(cancelled) >= 35
    others = [fut for fut in fs if not fut.cancelled()]
    for fut in others:
        assert fut.done()
        assert fut.exception() is None
    assert len(fs) == len(cancelled) + len(others)


def _cancel_pending(executor_type, tmp_path):
    started = tmp_path / "started"
    ex = executor_type(max_workers=1)
    try:
        first = ex.submit(T.log_start, str(started), "first", 1.5)
        queued = [ex.submit(pow, 2, i) for i in range(10)]
        T.wait_until(started.exists, 30, what="the first call to start")
        time.sleep(0.2)
        last = queued[-1]
        assert not last.running() and not last.done(), "a queued call claims to be running"
        assert last.cancel()
        assert last.cancelled()
        with pytest.raises(cf.CancelledError):
            last.result()
        assert first.result() == "first"
        assert [f.result() for f in queued[:5]] == [2 ** i for i in range(5)]
    finally:
        ex.shutdown(wait=True)


@pytest.mark.parametrize("kind", [
    "stdlib",
    "pipefarm",
])
@pytest.mark.slow
def test_future_cancel_on_pending_call(kind, tmp_path):
    _cancel_pending(EXECUTORS[kind], tmp_path)


# --- WaitTests / AsCompletedTests ------------------------------------------------------------------
def test_20369(executor):
    # https://bugs.python.org/issue20369: the same future twice in wait()
    future = executor.submit(operator.mul, 1, 2)
    done, not_done = cf.wait([future, future], return_when=cf.ALL_COMPLETED)
    assert done == {future}
    assert not_done == set()


@pytest.mark.slow
def test_wait_first_completed(executor):
    fixed = _fixed()
    future1 = executor.submit(operator.mul, 21, 2)
    future2 = executor.submit(time.sleep, 1.5)
    done, not_done = cf.wait([fixed["cancelled_only"], future1, future2],
                             return_when=cf.FIRST_COMPLETED)
    assert done == {future1}
    assert not_done == {fixed["cancelled_only"], future2}
    assert future1.result() == 42


@pytest.mark.slow
def test_wait_first_completed_some_already_completed(executor):
    fixed = _fixed()
    future1 = executor.submit(time.sleep, 1.5)
    finished, pending = cf.wait([fixed["cancelled"], fixed["successful"], future1],
                                return_when=cf.FIRST_COMPLETED)
    assert finished == {fixed["cancelled"], fixed["successful"]}
    assert pending == {future1}


@pytest.mark.slow
def test_wait_first_exception(executor):
    future1 = executor.submit(operator.mul, 2, 21)
    future2 = executor.submit(_sleep_and_raise, 0.5)
    future3 = executor.submit(time.sleep, 2.0)
    finished, pending = cf.wait([future1, future2, future3], return_when=cf.FIRST_EXCEPTION)
    assert finished == {future1, future2}
    assert pending == {future3}
    assert str(future2.exception()) == "this is an exception"


def test_wait_all_completed(executor):
    fixed = _fixed()
    future1 = executor.submit(divmod, 2, 0)
    future2 = executor.submit(operator.mul, 2, 21)
    finished, pending = cf.wait(
        [fixed["successful"], fixed["cancelled"], fixed["exception"], future1, future2],
        return_when=cf.ALL_COMPLETED)
    assert finished == {fixed["successful"], fixed["cancelled"], fixed["exception"], future1,
                        future2}
    assert pending == set()
    assert isinstance(future1.exception(), ZeroDivisionError)


@pytest.mark.slow
def test_wait_timeout(executor):
    fixed = _fixed()
    future = executor.submit(time.sleep, 2.0)
    finished, pending = cf.wait(
        [fixed["cancelled"], fixed["exception"], fixed["successful"], future],
        timeout=0.5, return_when=cf.ALL_COMPLETED)
    assert finished == {fixed["cancelled"], fixed["exception"], fixed["successful"]}
    assert pending == {future}


@pytest.mark.slow
def test_as_completed(executor):
    fixed = _fixed()
    future1 = executor.submit(T.sleep_then, "slow", 1.0)
    future2 = executor.submit(T.sleep_then, "fast", 0.0)
    seen = list(cf.as_completed([fixed["successful"], fixed["exception"], future1, future2]))
    assert set(seen) == {fixed["successful"], fixed["exception"], future1, future2}
    assert seen.index(future2) < seen.index(future1)
    # all of many calls come back exactly once
    fs = [executor.submit(T.square, i) for i in range(100)]
    got = sorted(f.result() for f in cf.as_completed(fs, timeout=60))
    assert got == sorted(i * i for i in range(100))


@pytest.mark.slow
def test_as_completed_timeout(executor):
    fixed = _fixed()
    future = executor.submit(time.sleep, 1.5)
    completed = set()
    with pytest.raises(TimeoutError):
        for f in cf.as_completed([fixed["successful"], future], timeout=0.3):
            completed.add(f)
    assert completed == {fixed["successful"]}


# --- pipefarm's own additions ----------------------------------------------------------------------
@pytest.mark.slow
def test_per_call_timeout_then_later_calls_work():
    with pf.Executor(max_workers=1, timeout=0.5) as ex:
        t0 = time.monotonic()
        slow = ex.submit(time.sleep, 30)
        with pytest.raises(pf.TaskFailed, match="timed out"):
            slow.result(timeout=20)
        assert time.monotonic() - t0 < 15
        assert ex.submit(pow, 2, 3).result(timeout=20) == 8
        assert list(ex.map(T.square, range(5))) == [0, 1, 4, 9, 16]


def test_dead_worker_fails_only_its_call():
    with pf.Executor(max_workers=2) as ex:
        f = ex.submit(os._exit, 3)
        with pytest.raises(pf.TaskFailed):
            f.result(timeout=30)
        assert ex.submit(operator.add, 2, 3).result(timeout=30) == 5
