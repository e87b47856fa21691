"""Scoring concurrent requests together, and a failed batch again request by request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trackflow.serving.model import ServedModel

    pass

log = logging.getLogger(__name__)


class Batcher:
    """Scores the rows of concurrent requests together, in the event loop's thread.

    A request queues its rows and waits. The first one queued schedules a flush ``turns`` turns
    of the event loop later: each turn reads the sockets that have data, so requests already sent
    join the batch, and no clock is waited on (an idle service adds microseconds). Requests
    arriving while a batch is scored form the next one. Each request is scored by the version
    it was checked against; a batch holds at most ``max_rows`` rows (or one request).
    """

    def __init__(self, max_rows: int, turns: int = 3) -> None:
        self.max_rows = max_rows
        self.turns = turns
        self._pending: list[tuple[ServedModel, np.ndarray, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._turns_left = 0

    async def score(self, served: ServedModel, values: np.ndarray) -> list[dict[str, Any]]:
        """Records of :meth:`ServedModel.score` for these rows, scored with others if any."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((served, values, future))
        if not self._scheduled:
            self._scheduled, self._turns_left = True, self.turns
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        if self._turns_left > 0:
            self._turns_left -= 1
            asyncio.get_running_loop().call_soon(self._flush)
            return
        pending, self._pending, self._scheduled = self._pending, [], False
        for batch in self._batches(pending):
            start = time.perf_counter()
            try:
                records = batch[0][0].score(np.concatenate([values for _, values, _ in batch]))
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0][2], exc)
                else:  # only the requests that fail on their own fail
                    self._score_alone(batch)
                continue
            log.debug(
                "scored %d requests, %d rows in %.2f ms",
                len(batch),
                len(records),
                (time.perf_counter() - start) * 1e3,
            )
            first = 0
            for _, values, future in batch:
                _answer(future, records[first : first + len(values)])
                first += len(values)

    @staticmethod
    def _score_alone(batch: list[Any]) -> None:
        """Score each request of a failed batch on its own: a bad request fails alone."""
        log.warning("a batch of %d requests failed; scoring them one by one", len(batch))
        for served, values, future in batch:
            try:
                records = served.score(values)
            except Exception as exc:
                _fail(future, exc)
            else:
                _answer(future, records)

    def _batches(self, pending: list[Any]) -> Iterator[list[Any]]:
        batch: list[Any] = []
        rows = 0
        for item in pending:
            if batch and (item[0] is not batch[0][0] or rows + len(item[1]) > self.max_rows):
                yield batch
                batch, rows = [], 0
            batch.append(item)
            rows += len(item[1])
        if batch:
            yield batch


def _answer(future: asyncio.Future[Any], records: list[dict[str, Any]]) -> None:
    if not future.done():  # done = the client went away
        future.set_result(records)


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
