"""One model's decoding in a thread of its own, shared by every request to it.

The event loop never waits on a forward pass: requests are handed to the worker, which joins
them into its running batch at the next step boundary (continuous batching, up to `max_batch`
rows and, with `max_cache_tokens`, only while the batch's planned KV cache stays within that
budget; the rest wait in arrival order), and hands each token back through a callback. A request
marked cancelled (a client gone, a stop string reached) leaves the batch at the next step. A
request whose decoding fails gets its error and leaves; the rows beside it go on (Decoder). A
decode step compiled in the background (decode/background.py) takes over between two steps.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from instructkit.decode.background import describe
from instructkit.decode.generate import Decoder, Request

log = logging.getLogger("instructkit.serve")

END = object()  # delivered once a request has finished (its finish_reason says why)


@dataclass
class _Job:
    request: Request
    deliver: Callable[[object], None]  # a token id, an Exception, or END


class Worker:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_cache_tokens: int | None = None,
                 name: str = "model"):
        self.decoder = Decoder(model, tokenizer.pad_id)
        self.max_batch, self.max_cache_tokens = max_batch, max_cache_tokens
        self.waiting: deque[_Job] = deque()
        self.jobs: dict[Request, _Job] = {}  # the rows being decoded
        self.ended: Counter[str] = Counter()  # finish reasons of the requests served so far
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self.thread.start()

    def submit(self, request: Request, deliver: Callable[[object], None]) -> None:
        with self.wake:
            self.waiting.append(_Job(self.decoder.fit(request), deliver))
            self.wake.notify()

    def cancel(self, request: Request, reason: str) -> None:
        """Mark a request cancelled (from any thread) and wake the worker, so a waiting request
        leaves the queue now rather than when it would have been admitted."""
        with self.wake:
            if not request.finished and not request.cancelled:
                request.cancelled = reason
            self.wake.notify()

    def state(self) -> dict:
        """What /health shows: rows decoding, requests waiting, finish reasons so far, and how the
        model decodes (decode/background.py's `describe`: eager while its step compiles, then compiled)."""
        with self.wake:
            return {"busy_rows": len(self.jobs), "waiting": len(self.waiting), "ended": dict(self.ended),
                    "cache_slots": self.decoder.cache.capacity * len(self.decoder) if self.decoder.cache else 0,
                    "decoding": describe(self.decoder.model)}

    def busy_rows(self) -> int:
        return len(self.jobs)

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def _fits(self, joining: list[Request]) -> bool:
        if self.max_cache_tokens is None or (not self.jobs and not joining[:-1]):
            return True  # one request alone always runs (the app caps it at the budget)
        return self.decoder.planned_slots(joining) <= self.max_cache_tokens

    def _admit(self) -> list[_Job]:
        with self.wake:
            while not self.stopping and not self.waiting and not self.jobs:
                self.wake.wait()
            self._drop_cancelled_waiting()
            room = self.max_batch - len(self.jobs)
            admitted: list[_Job] = []
            while self.waiting and len(admitted) < room:
                if not self._fits([job.request for job in admitted] + [self.waiting[0].request]):
                    break  # first come, first served: later requests wait behind this one
                admitted.append(self.waiting.popleft())
            return admitted

    def _drop_cancelled_waiting(self) -> None:
        for job in [job for job in self.waiting if job.request.cancelled]:  # gone before it started
            self.waiting.remove(job)
            job.request.finish_reason = job.request.cancelled
            self._end(job)

    def _end(self, job: _Job) -> None:
        request = job.request
        self.ended[request.finish_reason] += 1
        job.deliver(request.error if request.error is not None else END)

    def _run(self) -> None:
        while not self.stopping:
            admitted = self._admit()
            try:
                if admitted:
                    self.jobs.update({job.request: job for job in admitted})
                    self.decoder.join([job.request for job in admitted])
                for request, token in self.decoder.step():
                    self.jobs[request].deliver(token)
            except Exception as exc:  # the decoder ends failing rows itself: this is a bug of ours
                log.exception("decoding failed; ending %d request(s) with an error", len(self.jobs))
                for request in self.jobs:
                    request.error, request.finish_reason = exc, "error"
                self.decoder = Decoder(self.decoder.model, self.decoder.pad_id)
            with self.wake:
                for request in [r for r in self.jobs if r.finished]:
                    self._end(self.jobs.pop(request))
