"""Two processes under torchrun (gloo on CPU), for the multi-process tests: launched with
one thread each from the repository root, and failed cleanly when one hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# two CPU processes on a slow shared machine: minutes, not seconds, before calling it a hang
TORCHRUN_TIMEOUT = 600


def _torchrun(*args) -> subprocess.Popen:
    """``torchrun ARGS`` from the repository root, one thread per process, each process's
    stacks printed on SIGABRT (:func:`finish`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )


def launch(module: str, *args) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m MODULE ARGS``, one thread per process."""
    return _torchrun("--standalone", "--nproc_per_node", 2, "-m", module, *args)


def launch_node(node_rank: int, port: int, *args) -> subprocess.Popen:
    """One "node" of a two-node ``torchrun`` (one process each), as the docs launch it:
    ``--nnodes 2 --node_rank N --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT``,
    running ``s2ft ARGS``."""
    return _torchrun("--nnodes", 2, "--nproc_per_node", 1, "--node_rank", node_rank,
                     "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                     "--rdzv_id", "s2ft-test", "-m", "s2ft_cli", *args)  # fmt: skip


def free_port() -> int:
    """A TCP port of the loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers(pid: int) -> list[int]:
    """The processes torchrun ``pid`` started."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def finish(proc: subprocess.Popen, timeout: float = TORCHRUN_TIMEOUT):
    """Wait for a torchrun. Past ``timeout`` a process is taken to hang: each worker is sent
    SIGABRT, on which Python's fault handler (``PYTHONFAULTHANDLER``, set by the launch)
    prints every thread's stack, then torchrun SIGTERM, and the test fails with those
    stacks."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for worker in _workers(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGABRT)
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s (a process hangs?):\n{err[-8000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(*args, timeout: float = TORCHRUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``s2ft ARGS`` under torchrun with two processes."""
    return finish(launch("s2ft_cli", *args), timeout)
