"""A broker's retained store in process: what in-process studies publish weights and deltas through and devices
read back (`RetainedTopics.attach` takes it as the link; `agent.downlink.fetch` reads it as the receiver)."""

from __future__ import annotations


class RetainedStore:
    """The last payload retained per topic; an empty payload clears the topic, as on a broker."""

    def __init__(self) -> None:
        self.held: dict[str, bytes] = {}

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 0) -> None:
        if payload:
            self.held[topic] = payload
        else:
            self.held.pop(topic, None)

    def receive(self, names: list[str], wait: float) -> list[bytes | None]:
        return [self.held.get(name) for name in names]
