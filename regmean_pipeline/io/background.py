"""Output writes on a thread of their own, so that copying the merged tensors into the page cache
overlaps the solves instead of following each batch.

A ``pwrite`` of a fresh file costs a page allocation per 4 KiB: on the bench's 2-core EPYC the
Llama-shaped merge spent 0.9 s of its 12.8 s solve phase writing its 410 MB of solved weights. Handed
to a writer thread (which releases the GIL while the kernel copies), that time overlaps the next batch's
products; the queue holds at most ``max_pending_bytes`` of tensors (or one larger tensor) and the
producer waits beyond it, so memory stays bounded.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType

import torch

Write = Callable[[str, torch.Tensor], None]


class BackgroundWrites:
    """``write(name, tensor)`` calls run in order on one thread; use as a context manager around the
    producer. A tensor handed over must not be changed afterwards (the merge hands over finished ones).

    The first error of a write is raised in the producer, at its next call or on leaving the context;
    leaving because of an error of the producer's own discards what is still queued.
    """

    def __init__(self, write: Write, max_pending_bytes: int) -> None:
        self._write = write
        self._limit = max(1, max_pending_bytes)
        self._queue: deque[tuple[str, torch.Tensor, int]] = deque()  # name, tensor, bytes
        self._pending_bytes = 0
        self._closed = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="regmean-writer", daemon=True)

    def __enter__(self) -> BackgroundWrites:
        self._thread.start()
        return self

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self._changed:
            while self._error is None and self._queue and self._pending_bytes + size > self._limit:
                self._changed.wait()
            self._raise_error()
            self._queue.append((name, tensor, size))
            self._pending_bytes += size
            self._changed.notify_all()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        with self._changed:
            self._closed = True
            if kind is not None:  # the producer failed: what is queued will not be published anyway
                self._queue.clear()
            self._changed.notify_all()
        self._thread.join()
        if kind is None:
            with self._changed:
                self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closed:
                    self._changed.wait()
                if not self._queue:
                    return
                name, tensor, size = self._queue[0]
            try:
                self._write(name, tensor)
            except BaseException as exc:  # handed to the producer
                with self._changed:
                    self._error = exc
                    self._queue.clear()
                    self._pending_bytes = 0
                    self._changed.notify_all()
                return
            with self._changed:
                if self._queue:  # cleared meanwhile if the producer failed
                    self._queue.popleft()
                    self._pending_bytes -= size
                self._changed.notify_all()
            del tensor
