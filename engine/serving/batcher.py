"""The dynamic batcher: rows of concurrent requests gathered into one model call.

    batcher = DynamicBatcher(run, max_batch=64, max_delay_s=0.002, max_queue=1024,
                             executor=ThreadPoolExecutor(1))
    batcher.start()                                   # inside the event loop
    with batcher.arriving():                          # optional, see wait_for_arrivals below
        z, labels = ...                               # read and check the request's body
        pending = batcher.submit((z, labels))         # a future: cancel it to drop the request
    outputs = await pending                           # each (B, ...): exactly this request's rows
    await batcher.close()                             # drain: finish what is queued, then stop

One worker task per batcher. A request is a tuple of arrays that share their leading (row)
axis, e.g. (z (B, *latent_shape), labels (B,)). The worker waits for the first request, then
keeps gathering until the queue holds `max_batch` rows or the oldest request has waited
`max_delay_s` -- with `wait_for_arrivals`, it waits only while another request is between
`arriving()` and `submit()`, so a lone request runs at once and the delay is paid only when
batch-mates are actually on their way. It takes up to `max_batch` rows in arrival order (a
request larger than that is split over several batches), concatenates them, runs `run` on the
executor's thread (the event loop never runs the model) and hands each request back exactly
its own rows:

    batch = concat_i rows_i          run(batch) = (out_1, ..., out_k), each (sum_i B_i, ...)
    request i gets out_j[o_i : o_i + B_i] for every output j,   o_i = sum_{h<i} B_h

Failure and cancellation:
  - a request whose awaiting task is cancelled (its client went away) is dropped: rows not yet
    taken are skipped, rows already running are discarded when the batch returns;
  - when a batch with several requests fails, each request is rerun alone, so only the one(s)
    that fail by themselves get the exception;
  - `submit` raises QueueFull when `max_queue` requests are already waiting, and Closed once
    `close()` has begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

Arrays = tuple[np.ndarray, ...]
RunFn = Callable[[Arrays], Sequence[np.ndarray]]


class QueueFull(RuntimeError):
    """The batcher already holds `max_queue` waiting requests: the caller should retry later."""


class Closed(RuntimeError):
    """The batcher is draining or stopped and takes no new requests."""


@dataclass(eq=False)
class _Request:
    inputs: Arrays
    rows: int
    future: asyncio.Future
    arrived: float
    taken: int = 0  # rows handed to batches so far
    parts: list[Arrays] = field(default_factory=list)  # output chunks received, in order


Slice = tuple[_Request, int, int]  # (request, first row, end row) inside one batch


class DynamicBatcher:
    """Gathers rows of concurrent `submit` calls into batches of at most `max_batch` rows."""

    def __init__(self, run: RunFn, *, max_batch: int, max_delay_s: float, max_queue: int,
                 executor: Executor, on_batch: Callable[[int, float], None] | None = None,
                 wait_for_arrivals: bool = False) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_delay_s >= 0, got"
                             f" {max_batch}, {max_queue}, {max_delay_s}")
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._run, self._executor, self._on_batch = run, executor, on_batch
        self._queue: deque[_Request] = deque()
        self._waiting = 0  # requests with rows not yet taken (the queue depth)
        self._rows = 0  # rows not yet taken
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._wait_for_arrivals = wait_for_arrivals
        self._arriving = 0  # requests between arriving() and submit()

    # --- public ----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting for (part of) a batch."""
        return self._waiting

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._worker())

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (its body being read and checked) until it is
        submitted or refused. With wait_for_arrivals, a batch waits for batch-mates (up to
        max_delay_s) only while some request is on its way; with none, it runs at once, so a
        lone request pays no delay."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if not self._arriving and self._wake is not None:  # the last one on its way
                self._wake.set()

    def submit(self, inputs: Sequence[np.ndarray]) -> asyncio.Future:
        """Queue one request; the future resolves to its outputs, one array per model output,
        each (B, ...). Cancelling the future (or a task awaiting it) drops the request."""
        if self._closing or self._task is None:
            raise Closed("the server is shutting down" if self._closing else "not started")
        if self._waiting >= self.max_queue:
            raise QueueFull(f"{self._waiting} requests are already waiting (--max-queue"
                            f" {self.max_queue})")
        rows = int(inputs[0].shape[0])
        if rows < 1 or any(a.shape[:1] != (rows,) for a in inputs):
            raise ValueError(f"every input needs the same number (>= 1) of rows, got shapes"
                             f" {[a.shape for a in inputs]}")
        loop = asyncio.get_running_loop()
        request = _Request(tuple(inputs), rows, loop.create_future(), loop.time())
        request.future.add_done_callback(lambda _: self._forget(request))
        self._queue.append(request)
        self._waiting += 1
        self._rows += rows
        # Wake the worker only when that can change its decision: a first request (it sleeps
        # without a deadline), a full batch, or nobody else on the way.
        if len(self._queue) == 1 or self._rows >= self.max_batch or (
                self._wait_for_arrivals and not self._arriving):
            self._wake.set()
        return request.future

    async def close(self) -> None:
        """Stop taking requests, finish every queued one (without waiting out max_delay_s),
        then stop the worker."""
        self._closing = True
        if self._task is not None:
            self._wake.set()
            await self._task

    # --- bookkeeping -----------------------------------------------------------------------
    def _forget(self, request: _Request) -> None:
        """A request finished early (cancelled, or failed part-way): its untaken rows go."""
        if request.taken < request.rows:
            self._waiting -= 1
            self._rows -= request.rows - request.taken
            request.taken = request.rows  # the worker pops it when it reaches the head

    def _take(self) -> list[Slice]:
        """Up to max_batch rows from the head of the queue, in arrival order, from requests
        whose rows have the head's shapes and dtypes (a model with dynamic axes, e.g. a
        latent's height and width, gets one batch per shape)."""
        batch: list[Slice] = []
        room = self.max_batch
        while room and self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled or failed: its rows were forgotten
                self._queue.popleft()
                continue
            if batch and _row_kind(request) != _row_kind(batch[0][0]):
                break
            k = min(room, request.rows - request.taken)
            batch.append((request, request.taken, request.taken + k))
            request.taken += k
            self._rows -= k
            room -= k
            if request.taken == request.rows:
                self._queue.popleft()
                self._waiting -= 1
        return batch

    # --- the worker ------------------------------------------------------------------------
    async def _worker(self) -> None:
        """Gather, take, run, deliver; returns once closing and nothing is left."""
        while True:
            await self._gathered()
            batch = self._take()
            if not batch:
                if self._closing:
                    return
                continue
            try:
                await self._run_batch(batch)
            except Exception as error:  # a bug here must not stop the worker: fail the batch
                for request, _, _ in batch:
                    self._fail(request, error)

    async def _gathered(self) -> None:
        """Return once a batch should run: max_batch rows queued, or the oldest request has
        waited max_delay_s, or (wait_for_arrivals) no other request is on its way; at once
        while closing."""
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()
            if self._queue:
                wait = self._queue[0].arrived + self.max_delay_s - loop.time()
                nobody_coming = self._wait_for_arrivals and not self._arriving
                if self._rows >= self.max_batch or wait <= 0 or nobody_coming or self._closing:
                    return
            elif self._closing:
                return
            else:
                wait = None
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _run_batch(self, batch: list[Slice]) -> None:
        batch = [s for s in batch if not s[0].future.done()]
        if not batch:
            return
        try:
            outputs = await self._call(batch)
        except Exception as error:
            if len(batch) == 1:
                self._fail(batch[0][0], error)
                return
            for piece in batch:  # rerun alone: only the culprit fails
                if piece[0].future.done():
                    continue
                try:
                    self._deliver([piece], await self._call([piece]))
                except Exception as alone:
                    self._fail(piece[0], alone)
            return
        self._deliver(batch, outputs)

    async def _call(self, batch: list[Slice]) -> Arrays:
        n_inputs = len(batch[0][0].inputs)
        inputs = tuple(np.concatenate([r.inputs[i][a:b] for r, a, b in batch])
                       for i in range(n_inputs))  # a fresh, writable, contiguous copy
        start = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run,
                                                                   inputs)
        if self._on_batch is not None:
            self._on_batch(int(inputs[0].shape[0]), time.perf_counter() - start)
        outputs = tuple(outputs)
        rows = inputs[0].shape[0]
        if any(o.shape[:1] != (rows,) for o in outputs):
            raise RuntimeError(f"the model returned {[o.shape for o in outputs]} for a batch of"
                               f" {rows} rows")
        return outputs

    @staticmethod
    def _deliver(batch: list[Slice], outputs: Arrays) -> None:
        offset = 0
        for request, a, b in batch:
            k = b - a
            if not request.future.done():
                request.parts.append(tuple(o[offset:offset + k] for o in outputs))
                if b == request.rows:
                    parts = request.parts
                    request.future.set_result(parts[0] if len(parts) == 1 else tuple(
                        np.concatenate(chunks) for chunks in zip(*parts)))
            offset += k

    @staticmethod
    def _fail(request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)


def _row_kind(request: _Request) -> tuple:
    return tuple((a.shape[1:], a.dtype) for a in request.inputs)
