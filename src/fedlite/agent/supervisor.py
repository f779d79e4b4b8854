"""The agent's side of a job: start its child process (`agent.worker`), answer what it asks, feed the watchdog.

The agent itself never imports numpy or a TFLite runtime: an idle agent holds only the broker connection. A job's
process starts in about 0.2 s, does its work, and exits (its memory with it). A job that crashes, or goes silent
(a hung runtime), ends as a failed job; the agent goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from fedlite.agent.host import Host, Job, NotDelivered, Outcome
from fedlite.agent.ipc import Pipe, PipeClosed
from fedlite.protocol.errors import ProtocolError

log = logging.getLogger("fedlite.agent")
SILENCE_SECONDS = 120.0  # a job that asks nothing for this long is stopped (training asks every 0.1 s)
STOP_GRACE_SECONDS = 10.0  # after the agent is told to stop, its job has this long to wind down
CALLS = frozenset(name for name in vars(Host) if not name.startswith("_"))  # what a job may ask


class Jobs:
    """Runs jobs in a child process; with `keep_seconds` > 0 the process waits that long for the next job before it
    is closed (rounds that follow within seconds then skip its start)."""

    def __init__(self, keep_seconds: float = 0.0) -> None:
        self.keep_seconds = keep_seconds
        self._kept: tuple[subprocess.Popen[bytes], Pipe] | None = None
        self._idle_since = 0.0

    def run(self, job: Job, host: Host, tick: Callable[[], None]) -> Outcome:
        """Run `job`, serving its calls on `host`; `tick` runs at least every 0.5 s (the watchdog). An outcome of
        kind "failed" when the process crashed or went silent."""
        job = dataclasses.replace(job, keep=self.keep_seconds > 0)
        process, pipe = self._process(job)
        try:
            outcome = _serve(pipe, process, host, tick)
        except PipeClosed:
            outcome = Outcome("failed", f"its process {_ended(process)}")
        if job.keep and process.poll() is None and outcome.kind != "failed":
            self._kept, self._idle_since = (process, pipe), time.monotonic()
        else:
            _close(process, pipe)
        return outcome

    def expire(self) -> None:
        """Close a kept process that has waited `keep_seconds` for a job."""
        if self._kept is not None and time.monotonic() - self._idle_since > self.keep_seconds:
            self.close()

    def close(self) -> None:
        if self._kept is not None:
            _close(*self._kept)
            self._kept = None

    def _process(self, job: Job) -> tuple[subprocess.Popen[bytes], Pipe]:
        """A kept process given `job`, or a new one (also when the kept one has gone)."""
        if self._kept is not None:
            process, pipe = self._kept
            self._kept = None
            try:
                pipe.send(job)
                return process, pipe
            except PipeClosed:
                _close(process, pipe)
        process, pipe = _spawn()
        with contextlib.suppress(PipeClosed):  # it died at once: serving it reports how
            pipe.send(job)
        return process, pipe


def _spawn() -> tuple[subprocess.Popen[bytes], Pipe]:
    to_child, from_agent = os.pipe()
    to_agent, from_child = os.pipe()
    # the job does no heavy linear algebra of its own (TFLite trains): one BLAS thread starts faster, uses less
    env = os.environ | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fedlite.agent.worker", str(to_child), str(from_child)],
                               pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL, env=env)
    os.close(to_child)
    os.close(from_child)
    return process, Pipe(to_agent, from_agent)


def _close(process: subprocess.Popen[bytes], pipe: Pipe) -> None:
    pipe.close()  # a kept process waiting for a job reads the end and exits
    _reap(process)


def _serve(pipe: Pipe, process: subprocess.Popen[bytes], host: Host, tick: Callable[[], None]) -> Outcome:
    heard = time.monotonic()
    stopping_since: float | None = None
    while True:
        tick()
        if not pipe.ready(0.5):
            silent = time.monotonic() - heard
            if stopping_since is None and host.closed(attempt=False):
                stopping_since = time.monotonic()
            if silent > SILENCE_SECONDS or (stopping_since and time.monotonic() - stopping_since > STOP_GRACE_SECONDS):
                process.kill()
                return Outcome("failed", f"its process did not answer for {silent:.0f} s and was stopped")
            continue
        message = pipe.receive()
        heard = time.monotonic()
        if message[0] == "done":
            outcome: Outcome = message[1]
            return outcome
        _, name, args, kwargs = message
        pipe.send(_answer(host, name, args, kwargs))


def _answer(host: Host, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if name not in CALLS:
        return ("not_delivered", f"no such call {name!r}")
    try:
        return ("ok", getattr(host, name)(*args, **kwargs))
    except ProtocolError as exc:
        return ("protocol", exc.reason, exc.detail)
    except NotDelivered as exc:
        return ("not_delivered", str(exc))


def _ended(process: subprocess.Popen[bytes]) -> str:
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _reap(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("a job's process did not exit: killed")
        process.kill()
        process.wait()
