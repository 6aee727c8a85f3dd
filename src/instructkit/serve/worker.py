"""One model's decoding in a thread of its own, shared by every request to it.

The event loop never waits on a forward pass: requests are handed to the worker, which joins
them into its running batch at the next step boundary (continuous batching, up to `max_batch`
rows; the rest wait in arrival order), and hands each token back through a callback. A request
marked cancelled (a client gone, a stop string reached) leaves the batch at the next step.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from instructkit.decode.generate import Decoder, Request

log = logging.getLogger("instructkit.serve")

END = object()  # delivered once a request has finished (its finish_reason says why)


@dataclass
class _Job:
    request: Request
    deliver: Callable[[object], None]  # a token id, an Exception, or END


class Worker:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, name: str = "model"):
        self.decoder = Decoder(model, tokenizer.pad_id)
        self.max_batch = max_batch
        self.waiting: deque[_Job] = deque()
        self.jobs: dict[Request, _Job] = {}  # the rows being decoded
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self.thread.start()

    def submit(self, request: Request, deliver: Callable[[object], None]) -> None:
        with self.wake:
            self.waiting.append(_Job(request, deliver))
            self.wake.notify()

    def busy_rows(self) -> int:
        return len(self.jobs)

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def _admit(self) -> list[_Job]:
        with self.wake:
            while not self.stopping and not self.waiting and not self.jobs:
                self.wake.wait()
            room = self.max_batch - len(self.jobs)
            admitted = []
            while self.waiting and len(admitted) < room:
                job = self.waiting.popleft()
                if job.request.cancelled:  # gone before it started
                    job.request.finish_reason = job.request.cancelled
                    job.deliver(END)
                    continue
                admitted.append(job)
            return admitted

    def _run(self) -> None:
        while not self.stopping:
            admitted = self._admit()
            try:
                if admitted:
                    self.decoder.join([job.request for job in admitted])
                    self.jobs.update({job.request: job for job in admitted})
                for request, token in self.decoder.step():
                    self.jobs[request].deliver(token)
            except Exception as exc:  # a failed forward pass ends every row with an error, never silently
                log.exception("decoding failed; ending %d request(s) with an error", len(self.jobs) + len(admitted))
                for job in list(self.jobs.values()) + admitted:
                    job.deliver(exc)
                self.jobs.clear()
                self.decoder = Decoder(self.decoder.model, self.decoder.pad_id)
                continue
            for request in [r for r in self.jobs if r.finished or r.cancelled]:
                if request.finished:
                    self.jobs.pop(request).deliver(END)
