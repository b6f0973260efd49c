"""Real `regmean` processes for the fault tests, started cheaply.

Each run is a separate OS process executing the real CLI (`stages.cli.app`), so SIGKILL, resource
limits and file locks act on it exactly as on the console script. The processes are forked from a
multiprocessing fork server that imported torch, transformers and datasets once, so a run costs a
fork instead of ten seconds of imports; a few tests also run the installed `regmean` script itself.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PRELOAD = ["stages.cli", "stages.stats", "stages.merge", "stages.plusplus", "datasets", "transformers", "torch", "tests.processes"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(_PRELOAD)


def _main(argv: list[str], log: str, file_size_limit: int | None) -> None:
    """Child: stdout and stderr to ``log``, an optional RLIMIT_FSIZE, then the CLI (exits with its code)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)  # many test processes share two cores
    if file_size_limit is not None:
        # Writes past the limit fail with EFBIG, as on a full disk, instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    from stages.cli import app

    sys.argv = ["regmean", *argv]
    app(argv, prog_name="regmean")


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _call(target: str, args: tuple, log: str, memory_headroom: int | None) -> None:
    """Child: call ``module:function(*args)`` with at most ``memory_headroom`` more address space.

    Exit 0 when it returns, 2 on RegMeanError (message printed), 3 on MemoryError.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if memory_headroom is not None:
        limit = _vm_size() + memory_headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    from regmean_pipeline.errors import RegMeanError

    module, name = target.split(":")
    try:
        getattr(importlib.import_module(module), name)(*args)
    except RegMeanError as exc:
        print(f"error: {exc}", flush=True)
        os._exit(2)
    except MemoryError:
        print("MemoryError", flush=True)
        os._exit(3)
    sys.stdout.flush()
    os._exit(0)


def call(target: str, *args, log: Path, memory_headroom: int | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``module:function(*args)`` in a child process; (exit code, what it printed)."""
    process = _context.Process(target=_call, args=(target, args, str(log), memory_headroom))
    process.start()
    code = Run(process, Path(log)).wait(timeout)
    return code, Path(log).read_text(errors="replace")


@dataclass
class Run:
    process: multiprocessing.process.BaseProcess
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            self.process.join()
            raise TimeoutError(f"regmean did not finish in {timeout}s; log:\n{self.output()}")
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def error_lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if line.startswith("error: ")]


def start(*args, log: Path, file_size_limit: int | None = None) -> Run:
    process = _context.Process(target=_main, args=([str(a) for a in args], str(log), file_size_limit))
    process.start()
    return Run(process, Path(log))


def run(*args, log: Path, file_size_limit: int | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run to the end; (exit code, everything it printed)."""
    child = start(*args, log=log, file_size_limit=file_size_limit)
    code = child.wait(timeout)
    return code, child.output()


def wait_for(condition, timeout: float = 120, interval: float = 0.005, run: Run | None = None) -> bool:
    """Poll ``condition`` until true; False if ``run`` ended first or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if run is not None and not run.alive():
            return bool(condition())
        time.sleep(interval)
    return False
