"""A job of the agent's child process (a round, a deployment): what it asks of the agent, and what it returns.

The agent itself stays small (no numpy, no TFLite runtime): it holds the broker connection, the pinned keys, the
gates' readings and the round's progress mark, and starts one short-lived child process per job
(`agent.worker`). The job reaches the broker only through a `Host`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedlite.agent.config import AgentConfig
from fedlite.agent.state import DeviceState
from fedlite.protocol.messages import DeployTarget, RoundAnnouncement


class NotDelivered(Exception):
    """A publish the broker refused, that was too large for it, or that it did not acknowledge in time."""


@dataclass(frozen=True)
class Job:
    """What a child process is started for (`kind` names one of `agent.worker.JOBS`)."""

    kind: str  # probe | round | deploy
    config: AgentConfig
    log_level: str = "INFO"
    announcement: RoundAnnouncement | None = None  # round: the attempt to take part in
    target: DeployTarget | None = None  # deploy: the model to install
    deployment_id: str = ""
    keep: bool = False  # after it, the process waits for another job (`[agent] keep_process_seconds`)


@dataclass(frozen=True)
class Outcome:
    """How a job ended, and what the agent's status reports that only the job could read (the data, the weights)."""

    kind: str  # round: trained | declined | aborted; deploy: deployed | failed; probe: probed | failed
    reason: str = ""
    num_examples: int = -1  # the training examples the job loaded (-1: it did not load them)
    held: tuple[str, int] | None = None  # (run, round) of the global weights held after the job (None: not read)
    encodings: tuple[str, ...] = ()  # probe: the update encodings this agent can produce


class Host(Protocol):
    """The agent, as its job's child process sees it (`agent.worker.PipeHost`)."""

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def wait(self, topic: str, until: float, verify: bool = True) -> bytes | None:
        """The next payload on `topic` (signature checked unless `verify` is false: raises ProtocolError if it fails);
        None at `until`, when the agent stops, or when the job's round attempt is over."""
        ...

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0) -> None:
        """QoS 1, acknowledged; raises NotDelivered."""
        ...

    def reading(self) -> DeviceState:
        """The device's state now, as the gates read it."""
        ...

    def closed(self, attempt: bool = True) -> str:
        """Why the job must stop now: "agent stopping", or (`attempt`) its round attempt is over; "" while it may
        go on."""
        ...

    def finished(self) -> None:
        """The round's update is delivered: the agent marks the attempt done (it never trains for it again)."""
        ...

    def status(self, state: str) -> None:
        """Publish the device's status with this state ("training")."""
        ...

    def bad(self, reason: str) -> None:
        """Count a refused message (a bad frame, relay or share)."""
        ...
