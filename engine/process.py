"""Starting and ending the engine's process tree, so that no engine outlives its gateway.

vLLM runs as a tree (API server, EngineCore, Worker, a resource tracker) in one process group. SIGTERM to the
group shuts it down cleanly, shared memory included; SIGKILL to the API server alone leaves the others running.
So every stop goes to the group, SIGTERM first and SIGKILL only for what is left after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flushgate.engine.command import EngineSpec

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn``: if this process dies, even by SIGKILL, the child gets ``sig``.

    The engine gets SIGTERM rather than SIGKILL because vLLM's server then takes its own workers down with it.
    """
    parent = os.getpid()  # compared by pid, not with 1: the parent may itself be PID 1 in a container

    def hook() -> None:  # runs in the child between fork and exec
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


class EngineProcess:
    """The engine's server process: its exit, and its output as an asyncio stream.

    Exit is watched through a pidfd rather than asyncio's subprocess transport, whose ``wait()`` also waits
    for the output pipe to close, which never happens while a crashed server's workers still hold it.
    """

    def __init__(self, popen: subprocess.Popen[bytes], output: asyncio.StreamReader, pipe: asyncio.BaseTransport):
        self._popen = popen
        self.output = output
        self._pipe = pipe

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        code = self._popen.poll()
        if code is not None:
            return code
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: block a thread instead
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._popen.wait()

    def close_output(self) -> None:
        self._pipe.close()


async def spawn(spec: EngineSpec, line_limit: int) -> EngineProcess:
    popen = subprocess.Popen(  # noqa: ASYNC220 - one fork+exec per engine start, a few milliseconds
        spec.argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=spec.env,
        start_new_session=True,  # its own process group: one signal reaches every process of the engine
        preexec_fn=die_with_parent(),
    )
    assert popen.stdout is not None
    output = asyncio.StreamReader(limit=line_limit)
    loop = asyncio.get_running_loop()
    pipe, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(output), popen.stdout)
    return EngineProcess(popen, output, pipe)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process is in the group; zombies wait for a reaper we don't control."""
    proc = Path("/proc")
    if not proc.is_dir():
        return signal_group(pgid, 0)
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


async def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)  # no kernel event announces an empty process group; poll briefly
    return True


async def end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM to every process of the group, SIGKILL to those still there after ``grace_s``."""
    if signal_group(pgid, signal.SIGTERM) and not await wait_group_gone(pgid, grace_s):
        signal_group(pgid, signal.SIGKILL)
        await wait_group_gone(pgid, 5.0)


async def terminate(proc: EngineProcess, grace_s: float) -> int:
    """Stop the engine's whole tree and return the server process's exit code."""
    await end_group(proc.pid, grace_s)
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(proc.wait(), 5.0)
    return -1
