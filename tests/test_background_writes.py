"""The merge's output writes on a thread of their own (io/background.py): in order, bounded, and with
the writer's errors (a full disk) surfacing in the merge, never lost."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from regmean_pipeline.io.background import BackgroundWrites


def test_writes_run_in_order_on_another_thread():
    written, threads = [], set()

    def write(name: str, tensor: torch.Tensor) -> None:
        written.append((name, tensor.clone()))
        threads.add(threading.current_thread().name)

    tensors = {f"t{i}": torch.full((i + 1, 3), float(i)) for i in range(20)}
    with BackgroundWrites(write, max_pending_bytes=64) as sink:
        for name, tensor in tensors.items():
            sink(name, tensor)
    assert [name for name, _ in written] == list(tensors)
    assert all(torch.equal(tensor, tensors[name]) for name, tensor in written)
    assert threads == {"regmean-writer"}


def test_the_queue_is_bounded_by_bytes():
    """A stalled writer holds the producer once the queue has its byte budget (one tensor beyond the
    budget is still accepted when nothing else waits)."""
    release, written = threading.Event(), []

    def write(name: str, tensor: torch.Tensor) -> None:
        release.wait()
        written.append(name)

    accepted = []

    def produce(sink: BackgroundWrites) -> None:
        for i in range(4):
            sink(f"t{i}", torch.zeros(10))  # 40 bytes each
            accepted.append(i)

    with BackgroundWrites(write, max_pending_bytes=100) as sink:
        producer = threading.Thread(target=produce, args=(sink,))
        producer.start()
        deadline = time.monotonic() + 5
        while len(accepted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a wrongly accepted third
        assert accepted == [0, 1]  # 80 of 100 bytes queued; a third would exceed them
        release.set()
        producer.join(5)
    assert accepted == [0, 1, 2, 3] and written == ["t0", "t1", "t2", "t3"]

    with BackgroundWrites(lambda name, tensor: None, max_pending_bytes=8) as sink:
        sink("large", torch.zeros(100))  # larger than the budget: accepted when the queue is empty


def test_a_failed_write_reaches_the_producer_and_stops_the_writes():
    written = []

    def write(name: str, tensor: torch.Tensor) -> None:
        if name == "t2":
            raise OSError(28, "No space left on device")
        written.append(name)

    with pytest.raises(OSError, match="No space left"):
        with BackgroundWrites(write, max_pending_bytes=1 << 20) as sink:
            for i in range(5):
                sink(f"t{i}", torch.zeros(4))
    assert written == ["t0", "t1"]


def test_a_failing_producer_discards_the_queue_and_keeps_its_own_error():
    release, written = threading.Event(), []

    def write(name: str, tensor: torch.Tensor) -> None:
        release.wait()
        written.append(name)

    timer = threading.Timer(0.3, release.set)  # the writer finishes t0 after the queue was discarded
    with pytest.raises(KeyError, match="producer"):
        with BackgroundWrites(write, max_pending_bytes=1 << 20) as sink:
            for i in range(3):
                sink(f"t{i}", torch.zeros(4))
            timer.start()
            raise KeyError("producer")
    assert written == ["t0"]  # the write under way when the producer failed, and nothing after it
