"""The ops' thread pool (bevfusion/ops/_threads.py): chunk order, the thread cap, errors, nesting, and no
change to torch's global state."""
import threading
import time

import pytest
import torch

from bevfusion.ops import _threads


@pytest.fixture
def torch_threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _concurrency(fn_time=0.002):
    """A chunk function that records how many chunks run at once, and which threads ran them."""
    state = {"now": 0, "max": 0, "threads": set()}
    lock = threading.Lock()

    def fn(lo, hi):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            state["threads"].add(threading.get_ident())
        time.sleep(fn_time)
        with lock:
            state["now"] -= 1
        return list(range(lo, hi))

    return fn, state


@pytest.mark.parametrize("nt", [1, 2, 3])
def test_results_in_chunk_order_and_at_most_torch_threads(nt, torch_threads):
    torch_threads(nt)
    fn, state = _concurrency()
    bounds = _threads.even_bounds(103, 17)
    out = _threads.run_chunks(fn, bounds)
    assert [i for part in out for i in part] == list(range(103))
    assert len(out) == 17 and state["max"] <= nt and len(state["threads"]) <= nt
    if nt == 1:
        assert state["threads"] == {threading.get_ident()}  # inline


def test_even_bounds():
    assert _threads.even_bounds(10, 3) == [0, 3, 6, 10]
    assert _threads.even_bounds(2, 5) == [0, 1, 2]
    assert _threads.even_bounds(0, 4) == [0]
    assert _threads.run_chunks(lambda lo, hi: 1 / 0, [0]) == []  # no chunk, no call


def test_error_reaches_the_caller(torch_threads):
    torch_threads(2)

    def fn(lo, hi):
        if lo == 5:
            raise KeyError("chunk 5")
        return lo

    with pytest.raises(KeyError, match="chunk 5"):
        _threads.run_chunks(fn, list(range(11)))


def test_nested_call_runs_inline(torch_threads):
    torch_threads(2)

    def inner(lo, hi):
        return threading.get_ident()

    def outer(lo, hi):
        return set(_threads.run_chunks(inner, [0, 1, 2, 3])), threading.get_ident()

    for ids, me in _threads.run_chunks(outer, [0, 1, 2, 3, 4]):
        assert len(ids) <= 2 and (ids == {me} or me == threading.main_thread().ident)


def test_concurrent_callers_while_the_pool_grows(torch_threads, monkeypatch):
    """Several Python threads call at once with different thread counts (the pool is replaced by a larger
    one meanwhile); every call gets all its chunks, torch's thread count is never set."""
    torch_threads(2)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    errors, results = [], {}

    def caller(k):
        try:
            fn, _ = _concurrency(0.0005)
            for rep in range(5):
                out = _threads.run_chunks(fn, _threads.even_bounds(50, 10), threads=2 + (k + rep) % 4)
                assert [i for part in out for i in part] == list(range(50))
            results[k] = True
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 6 and calls == [] and torch.get_num_threads() == 2


def test_chunks_run_without_grad(torch_threads):
    torch_threads(2)
    w = torch.ones(3, requires_grad=True)
    out = _threads.run_chunks(lambda lo, hi: (w * 2).requires_grad, [0, 1, 2, 3, 4])
    assert out == [False] * 4
