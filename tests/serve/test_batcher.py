"""engine.serving.batcher.DynamicBatcher without HTTP: row bookkeeping, max-batch and
max-delay semantics, full-queue rejection, cancelled requests, failure isolation, draining."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine.serving.batcher import Closed, DynamicBatcher, QueueFull


class Recorder:
    """A model: (x (B, 3), ids (B,)) -> (x @ W + b, ids * 2); records every batch's ids."""

    def __init__(self, gate: threading.Event | None = None, fail_on_negative: bool = False):
        rng = np.random.default_rng(0)
        self.w, self.b = rng.standard_normal((3, 5)), rng.standard_normal(5)
        self.batches: list[list[int]] = []
        self.gate, self.fail_on_negative = gate, fail_on_negative

    def reference(self, x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x @ self.w + self.b, ids * 2

    def __call__(self, inputs):
        x, ids = inputs
        self.batches.append(ids.tolist())
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_on_negative and (ids < 0).any():
            raise ValueError("negative id")
        return self.reference(x, ids)


def _batcher(model, **kw) -> tuple[DynamicBatcher, ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    settings = {"max_batch": 8, "max_delay_s": 0.005, "max_queue": 1000, **kw}
    return DynamicBatcher(model, executor=pool, **settings), pool


def _request(rng: np.random.Generator, first_id: int, rows: int):
    return rng.standard_normal((rows, 3)), np.arange(first_id, first_id + rows)


def test_each_request_gets_exactly_its_rows_with_random_sizes():
    rng = np.random.default_rng(random.randrange(2**31))
    max_batch = int(rng.integers(1, 17))
    sizes = rng.integers(1, 21, size=40).tolist()
    model = Recorder()
    sizes_seen: list[int] = []

    async def main():
        batcher, pool = _batcher(model, max_batch=max_batch, max_delay_s=0.002)
        batcher._on_batch = lambda rows, _: sizes_seen.append(rows)
        batcher.start()
        requests, first = [], 0
        for rows in sizes:
            requests.append(_request(rng, first, rows))
            first += rows

        async def one(x, ids):
            await asyncio.sleep(float(rng.uniform(0, 0.01)))
            return await batcher.submit((x, ids))

        results = await asyncio.gather(*(one(*r) for r in requests))
        await batcher.close()
        pool.shutdown()
        return requests, results

    requests, results = asyncio.run(main())
    for (x, ids), (y, twice) in zip(requests, results):
        ref_y, ref_twice = model.reference(x, ids)
        np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(twice, ref_twice)
    assert all(1 <= n <= max_batch for n in sizes_seen)
    assert sum(sizes_seen) == sum(sizes)
    seen = sorted(i for batch in model.batches for i in batch)
    assert seen == list(range(sum(sizes)))  # every row ran exactly once


def test_a_full_batch_runs_without_waiting_for_the_delay():
    model = Recorder()

    async def main():
        batcher, pool = _batcher(model, max_batch=8, max_delay_s=30.0)
        batcher.start()
        rng = np.random.default_rng(1)
        start = time.monotonic()
        await asyncio.wait_for(asyncio.gather(
            *(batcher.submit(_request(rng, 2 * i, 2)) for i in range(4))), 10)
        elapsed = time.monotonic() - start
        await batcher.close()
        pool.shutdown()
        return elapsed

    assert asyncio.run(main()) < 10
    assert [len(b) for b in model.batches] == [8]


def test_a_lone_request_waits_max_delay_and_late_arrivals_join_it():
    model = Recorder()
    delay = 0.3

    async def main():
        batcher, pool = _batcher(model, max_batch=64, max_delay_s=delay)
        batcher.start()
        rng = np.random.default_rng(2)
        start = time.monotonic()

        async def later(i: int):
            await asyncio.sleep(0.05 * i)
            return await batcher.submit(_request(rng, i, 1)), time.monotonic() - start

        done = await asyncio.gather(*(later(i) for i in range(3)))
        await batcher.close()
        pool.shutdown()
        return [t for _, t in done]

    times = asyncio.run(main())
    assert min(times) >= delay * 0.95  # timers may fire a hair early
    assert model.batches == [[0, 1, 2]]


def test_full_queue_is_refused_and_the_rest_complete():
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        batcher, pool = _batcher(model, max_batch=1, max_delay_s=0.0, max_queue=3)
        batcher.start()
        rng = np.random.default_rng(3)
        running = asyncio.ensure_future(batcher.submit(_request(rng, 0, 1)))
        while not model.batches:  # the first request is taken: it no longer waits
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher.submit(_request(rng, i, 1))) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        with pytest.raises(QueueFull, match="--max-queue 3"):
            await batcher.submit(_request(rng, 4, 1))
        gate.set()
        results = await asyncio.gather(running, *queued)
        await batcher.close()
        pool.shutdown()
        return results

    results = asyncio.run(main())
    assert [r[1].tolist() for r in results] == [[0], [2], [4], [6]]


def test_a_cancelled_request_is_dropped_from_its_batch():
    """The client of request 1 goes away while request 0 runs: its rows never reach the model;
    request 2's rows are cancelled while running: discarded, the others are delivered."""
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        batcher, pool = _batcher(model, max_batch=4, max_delay_s=0.0)
        batcher.start()
        rng = np.random.default_rng(4)
        first = asyncio.ensure_future(batcher.submit(_request(rng, 0, 2)))
        while not model.batches:
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(batcher.submit(_request(rng, 10, 3)))
        kept = asyncio.ensure_future(batcher.submit(_request(rng, 20, 2)))
        await asyncio.sleep(0.01)
        assert batcher.depth == 2
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.depth == 1
        gate.set()
        a, b = await first, await kept
        await batcher.close()
        pool.shutdown()
        return a, b, gone

    a, b, gone = asyncio.run(main())
    assert gone.cancelled()
    assert model.batches == [[0, 1], [20, 21]]
    assert a[1].tolist() == [0, 2] and b[1].tolist() == [40, 42]


def test_one_bad_request_does_not_fail_its_batch_mates():
    model = Recorder(fail_on_negative=True)

    async def main():
        batcher, pool = _batcher(model, max_batch=16, max_delay_s=0.05)
        batcher.start()
        rng = np.random.default_rng(5)
        good1, good2 = _request(rng, 0, 2), _request(rng, 5, 3)
        bad = (rng.standard_normal((2, 3)), np.array([7, -1]))
        results = await asyncio.gather(batcher.submit(good1), batcher.submit(bad),
                                       batcher.submit(good2), return_exceptions=True)
        await batcher.close()
        pool.shutdown()
        return results

    r1, r_bad, r2 = asyncio.run(main())
    assert isinstance(r_bad, ValueError) and "negative id" in str(r_bad)
    assert r1[1].tolist() == [0, 2] and r2[1].tolist() == [10, 12, 14]
    assert model.batches[0] == [0, 1, 7, -1, 5, 6, 7]  # one batch first, then one by one
    assert model.batches[1:] == [[0, 1], [7, -1], [5, 6, 7]]


def test_close_drains_without_waiting_out_the_delay_then_refuses():
    model = Recorder()

    async def main():
        batcher, pool = _batcher(model, max_batch=64, max_delay_s=30.0)
        batcher.start()
        rng = np.random.default_rng(6)
        pending = [asyncio.ensure_future(batcher.submit(_request(rng, i, 1))) for i in range(5)]
        await asyncio.sleep(0.01)
        await asyncio.wait_for(batcher.close(), 10)
        results = await asyncio.gather(*pending)
        with pytest.raises(Closed):
            await batcher.submit(_request(rng, 9, 1))
        pool.shutdown()
        return results

    results = asyncio.run(main())
    assert [r[1].tolist() for r in results] == [[0], [2], [4], [6], [8]]


def test_requests_with_mismatched_rows_are_refused_before_batching():
    async def main():
        batcher, pool = _batcher(Recorder())
        batcher.start()
        with pytest.raises(ValueError, match="same number"):
            await batcher.submit((np.zeros((2, 3)), np.arange(3)))
        await batcher.close()
        pool.shutdown()

    asyncio.run(main())


def test_wait_for_arrivals_waits_only_while_a_request_is_on_its_way():
    """A lone request runs at once (no 30 s delay); while another is between arriving() and
    submit(), the queued one waits for it and both share one batch."""
    model = Recorder()

    async def main():
        batcher, pool = _batcher(model, max_batch=64, max_delay_s=30.0, wait_for_arrivals=True)
        batcher.start()
        rng = np.random.default_rng(7)
        start = time.monotonic()
        await asyncio.wait_for(batcher.submit(_request(rng, 0, 1)), 10)
        lone = time.monotonic() - start
        body_read = asyncio.Event()

        async def slow_arrival():
            with batcher.arriving():
                await body_read.wait()  # e.g. a body still being read
                pending = batcher.submit(_request(rng, 20, 2))
            return await pending

        late = asyncio.ensure_future(slow_arrival())
        await asyncio.sleep(0.01)
        early = batcher.submit(_request(rng, 10, 1))
        await asyncio.sleep(0.1)
        assert not early.done()  # waiting for the request on its way
        body_read.set()
        await asyncio.wait_for(asyncio.gather(early, late), 10)
        await batcher.close()
        pool.shutdown()
        return lone

    assert asyncio.run(main()) < 10
    assert model.batches == [[0], [10, 20, 21]]
