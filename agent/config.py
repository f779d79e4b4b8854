"""The agent's TOML configuration (`/etc/fedlite/agent.toml`), validated on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedlite.agent.data import SOURCES, DataSpec
from fedlite.agent.deploy import DeploySection
from fedlite.agent.gates import GateThresholds
from fedlite.protocol.topics import check_id
from fedlite.settings import load_toml, read_secret, require


@dataclass
class DeviceSection:
    client_id: str
    federation: str
    state_dir: str = "/var/lib/fedlite-agent"

    def validate(self) -> None:
        check_id(self.client_id, "client_id")
        check_id(self.federation, "federation")


@dataclass
class BrokerSection:
    host: str = "localhost"
    port: int = 8883
    tls: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    keepalive: int = 30
    reconnect_min_seconds: float = 1.0
    reconnect_max_seconds: float = 60.0

    def validate(self) -> None:
        require(0 < self.port < 65536, f"port must be 1-65535, not {self.port}")
        require(5 <= self.keepalive <= 3600, "keepalive must be 5-3600 seconds")
        require(0 < self.reconnect_min_seconds <= self.reconnect_max_seconds, "need 0 < reconnect_min <= max")
        require(not (self.password and self.password_file), "set password or password_file, not both")

    def resolve_password(self) -> str | None:
        return read_secret(self.password, self.password_file, "broker password_file")


@dataclass
class StateSection:
    provider: str = "psutil"  # psutil | file
    file: str = ""
    idle_window_seconds: float = 30.0

    def validate(self) -> None:
        require(self.provider in ("psutil", "file"), f"provider must be psutil or file, not {self.provider!r}")
        require(self.provider != "file" or bool(self.file), "provider 'file' needs file = path")


@dataclass
class AgentSection:
    status_interval_seconds: float = 30.0
    threads: int = 1
    max_epochs: int = 20
    max_examples: int = 0  # 0: all local examples
    seed: int = 0

    def validate(self) -> None:
        require(self.status_interval_seconds >= 0.2, "status_interval_seconds must be >= 0.2")
        require(1 <= self.threads <= 64, "threads must be 1-64")
        require(self.max_epochs >= 1, "max_epochs must be >= 1")


@dataclass
class TrustSection:
    aggregator_keys: list[str] = field(default_factory=list)  # PEM Ed25519 public keys (several while rotating)
    allow_unsigned: bool = False  # accept unsigned broadcasts: only for a closed test network

    def validate(self) -> None:
        require(bool(self.aggregator_keys) or self.allow_unsigned,
                "pin the aggregator's public key (trust.aggregator_keys) or set trust.allow_unsigned = true")


@dataclass
class AgentConfig:
    device: DeviceSection
    data: DataSpec
    broker: BrokerSection = field(default_factory=BrokerSection)
    gates: GateThresholds = field(default_factory=GateThresholds)
    state: StateSection = field(default_factory=StateSection)
    agent: AgentSection = field(default_factory=AgentSection)
    trust: TrustSection = field(default_factory=TrustSection)
    deploy: DeploySection = field(default_factory=DeploySection)

    def validate(self) -> None:
        self.trust.validate()
        require(self.data.source in SOURCES, f"data.source must be one of {SOURCES}")
        require(0 <= self.data.holdout_fraction < 1, "data.holdout_fraction must be in [0, 1)")
        require(self.data.source != "hook" or bool(self.data.hook), "data.source 'hook' needs data.hook")
        require(self.data.source == "hook" or bool(self.data.path), f"data.source {self.data.source!r} needs data.path")


def load_config(path: str | Path) -> AgentConfig:
    return load_toml(AgentConfig, path)
