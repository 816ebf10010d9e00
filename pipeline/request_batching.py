"""Server-side batching for `relkd serve`, as TF Serving's `--enable_batching` does it.

Concurrent Predict requests for the same model version and signature are concatenated along
the batch axis, scored in one model call, and each request gets its own rows back. Under
concurrent load fewer, larger calls share out each call's fixed costs and cut the wait behind
other requests' calls (README, *Scoring and serving*, Load, measures what that gains); a request
that arrives while the server is idle runs at once unless `timeout_seconds` asks the batcher to
wait for company.

  * One thread runs the batches, in arrival order of their first request: on a 2-core machine
    TensorFlow already spreads one call over both cores.
  * A batch holds requests of one key (model version, signature) up to `max_batch_size` rows in
    all; a larger request runs alone. Nothing else is reordered.
  * Every output of the merged call must have one row per input row, or it cannot be split: the
    requests of that batch then run one by one. A call that raises fails every request of its
    batch with the same error, as it would have failed each of them.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable, Deque, Dict, Hashable, List

import numpy as np

Arrays = Dict[str, np.ndarray]
Model = Callable[[Arrays], Arrays]


@dataclasses.dataclass
class _Request:
    key: Hashable
    model: Model
    inputs: Arrays
    rows: int
    future: concurrent.futures.Future


class RequestBatcher:
    """`submit(key, model, inputs)` blocks until `model` has scored `inputs`, alone or merged
    with other requests of the same `key`; `stop()` finishes what is queued."""

    def __init__(self, max_batch_size: int = 1000, timeout_seconds: float = 0.0):
        if max_batch_size < 1 or timeout_seconds < 0:
            raise ValueError(f"max_batch_size must be >= 1 and timeout_seconds >= 0, got "
                             f"{max_batch_size} and {timeout_seconds}")
        self.max_batch_size = max_batch_size
        self.timeout_seconds = timeout_seconds
        self._queue: Deque[_Request] = collections.deque()
        self._condition = threading.Condition()
        self._stopped = False
        self.requests = 0  # answered or failed
        self.model_calls = 0
        self._thread = threading.Thread(target=self._loop, name="relkd-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, model: Model, inputs: Arrays) -> Arrays:
        rows = {len(value) for value in inputs.values()}
        if len(rows) != 1:
            raise ValueError(f"inputs must share one batch size, got {sorted(rows)}")
        request = _Request(key, model, inputs, rows.pop(), concurrent.futures.Future())
        with self._condition:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self._queue.append(request)
            self._condition.notify_all()
        return request.future.result()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopped:
                    self._condition.wait()
                if not self._queue:
                    return
                batch = self._collect()
            try:
                self._run(batch)
            except Exception as e:  # pylint: disable=broad-except
                # Never leave a client waiting on a request the thread gave up on.
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(e)

    def _collect(self) -> List[_Request]:
        """The oldest request and the queued ones of its key that fit, waiting up to the
        timeout for more while there is room. Called with the condition held."""
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            for request in list(self._queue):
                if request.key == first.key and rows + request.rows <= self.max_batch_size:
                    self._queue.remove(request)
                    batch.append(request)
                    rows += request.rows
            remaining = deadline - time.monotonic()
            if rows >= self.max_batch_size or remaining <= 0 or self._stopped:
                return batch
            self._condition.wait(remaining)

    def _call(self, model: Model, inputs: Arrays) -> Arrays:
        self.model_calls += 1
        return model(inputs)

    def _answer(self, request: _Request) -> None:
        try:
            request.future.set_result(self._call(request.model, request.inputs))
        except Exception as e:  # pylint: disable=broad-except
            request.future.set_exception(e)

    def _run(self, batch: List[_Request]) -> None:
        self.requests += len(batch)
        if len(batch) == 1:
            self._answer(batch[0])
            return
        total = sum(r.rows for r in batch)
        try:
            merged = {name: np.concatenate([r.inputs[name] for r in batch])
                      for name in batch[0].inputs}
            outputs = self._call(batch[0].model, merged)
        except Exception as e:  # pylint: disable=broad-except
            for request in batch:
                request.future.set_exception(e)
            return
        if any(np.ndim(value) == 0 or len(value) != total for value in outputs.values()):
            for request in batch:
                self._answer(request)
            return
        start = 0
        for request in batch:
            request.future.set_result({name: value[start:start + request.rows]
                                       for name, value in outputs.items()})
            start += request.rows
