"""The agent's child process: one job (probe, round, deploy) with numpy and the TFLite runtime loaded, then it exits.

    python -m fedlite.agent.worker READ_FD WRITE_FD    (started by `agent.supervisor`, never by hand)

It reads its `Job` from READ_FD, asks the agent for what it needs (`PipeHost`, the `Host` over the pipes), and
writes ("done", Outcome) to WRITE_FD.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlite.agent.data import DataError, LocalData, load_local_data
from fedlite.agent.host import Host, Job, NotDelivered, Outcome
from fedlite.agent.ipc import Pipe, PipeClosed
from fedlite.agent.state import DeviceState
from fedlite.protocol.errors import ProtocolError

log = logging.getLogger("fedlite.agent")
JOBS: dict[str, Callable[[Job, Host], Outcome]] = {}


def job(kind: str) -> Callable[[Callable[[Job, Host], Outcome]], Callable[[Job, Host], Outcome]]:
    def register(run: Callable[[Job, Host], Outcome]) -> Callable[[Job, Host], Outcome]:
        JOBS[kind] = run
        return run

    return register


def _data(j: Job) -> LocalData:
    return load_local_data(j.config.data)


def _held(j: Job) -> tuple[str, int]:
    from fedlite.agent.downlink import FILE, HeldWeights

    return HeldWeights(Path(j.config.device.state_dir) / FILE).status()


@job("probe")
def probe(j: Job, host: Host) -> Outcome:
    """At start: the data loads, and what the status reports about it, the held weights and the codecs."""
    from fedlite.protocol import codecs

    return Outcome("probed", num_examples=len(_data(j).x_train), held=_held(j), encodings=tuple(codecs.UPLINK))


@job("round")
def take_part(j: Job, host: Host) -> Outcome:
    from fedlite.agent.round import RoundRunner

    assert j.announcement is not None
    try:
        data = _data(j)
    except DataError as exc:  # shards removed since the start, say: this round is declined, the agent goes on
        return Outcome("declined", f"data: {exc}")
    return RoundRunner(j.config, j.announcement, data, host).run()


@job("deploy")
def install(j: Job, host: Host) -> Outcome:
    from fedlite.agent.deploy import Deployer, DeployError
    from fedlite.agent.install import deploy

    assert j.target is not None
    device = j.config.device
    deployer = Deployer(j.config.deploy, Path(device.state_dir), device.client_id, device.federation)
    try:
        deploy(deployer, j.target, j.deployment_id, host, _data(j))
    except (DeployError, DataError) as exc:
        return Outcome("failed", str(exc))
    return Outcome("deployed")


class PipeHost:
    """The `Host` of a job: each call a request to the agent over the pipe, answered before the job goes on."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.pipe.send(("call", name, args, kwargs))
        status, *value = self.pipe.receive()
        if status == "protocol":
            raise ProtocolError(*value)
        if status == "not_delivered":
            raise NotDelivered(*value)
        return value[0]

    def subscribe(self, topic: str) -> None:
        self._call("subscribe", topic)

    def unsubscribe(self, topic: str) -> None:
        self._call("unsubscribe", topic)

    def wait(self, topic: str, until: float, verify: bool = True) -> bytes | None:
        payload: bytes | None = self._call("wait", topic, until, verify)
        return payload

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0) -> None:
        self._call("publish", topic, payload, retain, timeout)

    def reading(self) -> DeviceState:
        state: DeviceState = self._call("reading")
        return state

    def closed(self, attempt: bool = True) -> str:
        return str(self._call("closed", attempt))

    def finished(self) -> None:
        self._call("finished")

    def status(self, state: str) -> None:
        self._call("status", state)

    def bad(self, reason: str) -> None:
        self._call("bad", reason)


def run(j: Job, host: Host) -> Outcome:
    try:
        return JOBS[j.kind](j, host)
    except DataError as exc:
        return Outcome("failed", str(exc))


def main(argv: list[str]) -> int:
    from fedlite.logs import configure_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent too: it stops this job through the pipe
    pipe = Pipe(int(argv[0]), int(argv[1]))
    try:
        j: Job = pipe.receive()
        configure_logging(j.log_level)
        while True:
            pipe.send(("done", _outcome(j, PipeHost(pipe))))
            if not j.keep:
                return 0
            j = pipe.receive()  # the next job; the agent closes the pipe when it keeps this process no longer
    except PipeClosed:  # the agent is gone, or let this process go
        return 0


def _outcome(j: Job, host: Host) -> Outcome:
    try:
        return run(j, host)
    except PipeClosed:
        raise
    except Exception as exc:  # a defect: the agent reports the job failed and goes on
        log.exception("%s job failed", j.kind)
        return Outcome("failed", f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
