"""The agent's TOML configuration (`/etc/fedlite/agent.toml`), validated on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fedlite.agent.dataspec import SOURCES, DataSpec
from fedlite.agent.deploy import DeploySection
from fedlite.agent.gates import GateThresholds
from fedlite.protocol.topics import check_id
from fedlite.settings import PORT, SEED, FieldRanges, Range, load_toml, read_secret, require


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
    port: Annotated[int, PORT] = 8883
    tls: bool = True
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    keepalive: Annotated[int, Range(ge=5, le=3600)] = 30  # seconds
    reconnect_min_seconds: Annotated[float, Range(gt=0)] = 1.0
    reconnect_max_seconds: Annotated[float, Range(gt=0)] = 60.0

    def validate(self) -> None:
        require(self.reconnect_min_seconds <= self.reconnect_max_seconds,
                f"reconnect_min_seconds must be <= reconnect_max_seconds ({self.reconnect_max_seconds:g}), "
                f"not {self.reconnect_min_seconds:g}")
        require(not (self.password and self.password_file), "password_file or password: set one, not both")

    def resolve_password(self) -> str | None:
        return read_secret(self.password, self.password_file, "broker password_file")


@dataclass
class StateSection:
    provider: str = "psutil"  # psutil | file
    file: str = ""
    idle_window_seconds: Annotated[float, Range(gt=0)] = 30.0

    def validate(self) -> None:
        require(self.provider in ("psutil", "file"), f"provider must be psutil or file, not {self.provider!r}")
        require(self.provider != "file" or bool(self.file), "file is required with provider = \"file\"")


@dataclass
class AgentSection:
    status_interval_seconds: Annotated[float, Range(ge=0.2)] = 30.0
    threads: Annotated[int, Range(ge=1, le=64)] = 1
    max_epochs: Annotated[int, Range(ge=1)] = 20
    max_examples: Annotated[int, Range(ge=1, special=0, means="all local examples")] = 0
    # the local shuffles' seed: 0 derives one from the client id (a run repeats exactly); -1 draws from the OS
    seed: Annotated[int, Range(ge=0, special=-1, means="unseeded shuffles")] = 0
    # each round (and deployment) runs in a child process that exits after it, so an idle agent holds neither numpy
    # nor the TFLite runtime; > 0 keeps it this many seconds for the next job (rounds that follow within seconds,
    # many simulated devices on one machine), holding its memory until then
    keep_process_seconds: Annotated[float, Range(ge=0, special=0, means="a process per job")] = 0.0


@dataclass
class PersonalizationSection:
    """On-device personalization (`agent.personalize`): after each round, fine-tune a copy of the global model."""

    enabled: bool = False
    epochs: Annotated[int, Range(ge=1)] = 3
    learning_rate: Annotated[float, Range(ge=0, special=0, means="the round plan's")] = 0.0
    head_only: bool = True  # the last layer alone (train_head); false: every weight
    # serve the personalized model when its held-out accuracy beats the global model's by more than this
    min_gain: Annotated[float, Range(ge=0, le=1)] = 0.0


@dataclass
class TrustSection:
    aggregator_keys: list[str] = field(default_factory=list)  # PEM Ed25519 public keys (several while rotating)
    allow_unsigned: bool = False  # accept unsigned broadcasts: only for a closed test network

    def validate(self) -> None:
        require(bool(self.aggregator_keys) or self.allow_unsigned,
                "pin the aggregator's public key (trust.aggregator_keys) or set trust.allow_unsigned = true")


# Sections whose dataclasses belong to the agent's components; their bounds as configuration:
DATA_RANGES = FieldRanges(holdout_fraction=Range(ge=0, lt=1), seed=SEED)
GATE_RANGES = FieldRanges(
    max_cpu_percent=Range(ge=0, le=100),
    max_load_per_cpu=Range(ge=0),
    min_battery_percent=Range(ge=0, le=100),
    max_temperature_c=Range(ge=0, le=150),
    min_available_memory_mb=Range(ge=0),
)
DEPLOY_RANGES = FieldRanges(fetch_timeout_seconds=Range(gt=0))


@dataclass
class AgentConfig:
    device: DeviceSection
    data: Annotated[DataSpec, DATA_RANGES]
    broker: BrokerSection = field(default_factory=BrokerSection)
    gates: Annotated[GateThresholds, GATE_RANGES] = field(default_factory=GateThresholds)
    state: StateSection = field(default_factory=StateSection)
    agent: AgentSection = field(default_factory=AgentSection)
    trust: TrustSection = field(default_factory=TrustSection)
    deploy: Annotated[DeploySection, DEPLOY_RANGES] = field(default_factory=DeploySection)
    personalization: PersonalizationSection = field(default_factory=PersonalizationSection)

    def validate(self) -> None:
        self.trust.validate()
        require(self.data.source in SOURCES, f"data.source must be one of {SOURCES}")
        require(self.data.source != "hook" or bool(self.data.hook), "data.source 'hook' needs data.hook")
        require(self.data.source == "hook" or bool(self.data.path), f"data.source {self.data.source!r} needs data.path")


def load_config(path: str | Path) -> AgentConfig:
    return load_toml(AgentConfig, path)
