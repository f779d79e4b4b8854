"""The aggregator's TOML configuration: one federation, its model, rounds, strategy and broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedlite.aggregator.kpis import KpiSettings
from fedlite.protocol.messages import TrainingPlan
from fedlite.protocol.topics import check_id
from fedlite.settings import load_toml, read_secret, require


@dataclass
class FederationSection:
    name: str
    state_dir: str = "/var/lib/fedlite-aggregator"

    def validate(self) -> None:
        check_id(self.name, "federation name")


@dataclass
class ModelSection:
    arch: str = "mlp"
    input_shape: list[int] = field(default_factory=lambda: [64])
    classes: int = 10
    options: dict = field(default_factory=dict)
    builder: str = ""  # "package.module:function" for a user's own architecture
    seed: int = 0
    downlink_dtype: str = "float32"  # float32 | float16
    export_every: int = 1  # re-export TFLite models every N completed rounds (0: only at the end)

    def validate(self) -> None:
        require(all(d > 0 for d in self.input_shape) and self.input_shape, "input_shape needs positive sizes")
        require(self.classes >= 2, "classes must be >= 2")
        require(self.downlink_dtype in ("float32", "float16"), "downlink_dtype must be float32 or float16")
        require(self.export_every >= 0, "export_every must be >= 0")


@dataclass
class RoundsSection:
    total: int = 10
    clients_per_round: int = 10  # K: the round closes once K updates are accepted
    quorum: int = 0  # minimum accepted updates at the deadline; 0 means ceil(K / 2)
    over_selection: float = 0.3  # select K * (1 + over_selection) devices
    deadline_seconds: float = 60.0
    wait_for_devices_seconds: float = 60.0  # how long to wait for K eligible devices before going with fewer
    max_attempts: int = 3  # a round below quorum is retried this many times, then the run stops
    status_ttl_seconds: float = 90.0  # a device silent for longer is not selected
    seed: int = 0

    def validate(self) -> None:
        require(self.total >= 1, "total must be >= 1")
        require(self.clients_per_round >= 1, "clients_per_round must be >= 1")
        require(0 <= self.quorum <= self.clients_per_round, "quorum must be between 0 and clients_per_round")
        require(0 <= self.over_selection <= 5, "over_selection must be between 0 and 5")
        require(self.deadline_seconds > 0, "deadline_seconds must be > 0")
        require(self.max_attempts >= 1, "max_attempts must be >= 1")

    @property
    def min_accepted(self) -> int:
        return self.quorum or -(-self.clients_per_round // 2)


@dataclass
class ServerSection:
    optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    aggregation: str = "mean"  # mean | trimmed_mean | median
    trim_fraction: float = 0.1
    sum_dtype: str = "float32"  # running-sum precision; rounding stays far below int8 quantization error
    max_update_norm: float = 0.0  # 0: no bound
    norm_policy: str = "clip"  # clip | reject
    max_update_bytes: int = 64 * 1024 * 1024
    max_examples: int = 1_000_000
    max_abs_value: float = 1e3
    # One device's influence (see `fedlite.aggregator.influence`): weight cap, adaptive norm bound, step bound.
    example_multiple: float = 2.0  # weight <= this x the selected devices' median advertised example count
    norm_multiple: float = 2.0  # clip an update to this x the median norm of recent rounds (0: off)
    norm_refuse_multiple: float = 10.0  # refuse (and flag) an update beyond this x that median (0: only clip)
    norm_window: int = 5  # complete rounds whose accepted norms form that median
    norm_warmup: int = 3  # without such rounds, updates held until this many set the first bound
    max_step_ratio: float = 1.0  # refuse to commit a step longer than this x the weights' norm (0: off)

    def validate(self) -> None:
        require(self.example_multiple >= 1, "example_multiple must be >= 1")
        require(self.norm_multiple == 0 or self.norm_multiple >= 1, "norm_multiple must be 0 (off) or >= 1")
        require(self.norm_refuse_multiple == 0 or self.norm_refuse_multiple >= self.norm_multiple,
                "norm_refuse_multiple must be 0 (never) or >= norm_multiple")
        require(self.norm_window >= 1 and self.norm_warmup >= 1, "norm_window and norm_warmup must be >= 1")
        require(self.max_step_ratio >= 0, "max_step_ratio must be >= 0 (0: off)")
        require(self.optimizer in ("fedavg", "fedavgm", "fedadam"), "optimizer must be fedavg, fedavgm or fedadam")
        require(self.aggregation in ("mean", "trimmed_mean", "median"),
                "aggregation must be mean, trimmed_mean or median")
        require(self.norm_policy in ("clip", "reject"), "norm_policy must be clip or reject")
        require(self.sum_dtype in ("float32", "float64"), "sum_dtype must be float32 or float64")
        require(0 <= self.trim_fraction < 0.5, "trim_fraction must be in [0, 0.5)")
        require(self.learning_rate > 0 and self.max_update_bytes > 0, "learning_rate and max_update_bytes must be > 0")


@dataclass
class BrokerSection:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""
    username: str = "aggregator"
    password: str = ""
    password_file: str = ""
    share_group: str = ""  # MQTT v5 shared subscription group for several aggregators

    def validate(self) -> None:
        require(0 < self.port < 65536, f"port must be 1-65535, not {self.port}")
        if self.share_group:
            check_id(self.share_group, "share_group")

    def resolve_password(self) -> str | None:
        return read_secret(self.password, self.password_file, "broker password_file")


@dataclass
class EvaluationSection:
    test_data: str = ""  # .npz with x and y: a server-held test set
    calibration_examples: int = 200  # examples of it used to calibrate the int8 inference model


@dataclass
class MetricsSection:
    prometheus_port: int = 0  # 0: no endpoint
    prometheus_host: str = "127.0.0.1"


@dataclass
class SigningSection:
    key_file: str = ""  # Ed25519 private key (PEM) that signs every broadcast; make one with `fedlite keys`


@dataclass
class PrivacySection:
    """DP-FedAvg (see `strategies.dp`): clip each update to clip_norm, add N(0, (noise_multiplier * clip_norm)^2)."""

    enabled: bool = False
    clip_norm: float = 1.0  # S: the L2 bound of each device's update
    noise_multiplier: float = 1.0  # z: noise std on the sum, in units of clip_norm
    delta: float = 1e-5  # the δ at which ε is reported; well below 1 / fleet size
    fleet_size: int = 0  # N for the sampling rate q = selected / N; 0: the devices the aggregator has heard from
    seed: int = -1  # noise seed (reproducible, for tests); -1: unseeded, drawn from the OS CSPRNG

    def validate(self) -> None:
        require(self.clip_norm > 0 and self.noise_multiplier > 0, "clip_norm and noise_multiplier must be > 0")
        require(0 < self.delta < 1, "delta must be in (0, 1)")
        require(self.fleet_size >= 0, "fleet_size must be >= 0 (0: the devices the aggregator knows)")
        require(self.seed >= -1, "seed must be >= 0, or -1 for unseeded noise")


@dataclass
class RolloutSection:
    """Staged rollout of registry versions to the fleet (see `fedlite.aggregator.rollout`)."""

    canary_fraction: float = 0.3  # of the online devices that get a promoted candidate first
    min_canaries: int = 1
    margin: float = 0.02  # promote when mean candidate accuracy >= mean current accuracy - margin
    timeout_seconds: float = 60.0  # decide with the reports so far (at least one) after this long
    serve_after_rounds: bool = False  # keep running after the last round, serving rollouts until stopped

    def validate(self) -> None:
        require(0 < self.canary_fraction <= 1, "canary_fraction must be in (0, 1]")
        require(self.min_canaries >= 1, "min_canaries must be >= 1")
        require(0 <= self.margin <= 1, "margin must be in [0, 1]")
        require(self.timeout_seconds > 0, "timeout_seconds must be > 0")


@dataclass
class AggregatorConfig:
    federation: FederationSection
    model: ModelSection = field(default_factory=ModelSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    training: TrainingPlan = field(default_factory=TrainingPlan)
    server: ServerSection = field(default_factory=ServerSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    signing: SigningSection = field(default_factory=SigningSection)
    kpis: KpiSettings = field(default_factory=KpiSettings)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    rollout: RolloutSection = field(default_factory=RolloutSection)

    def validate(self) -> None:
        t = self.training
        require(t.epochs >= 1 and t.batch_size >= 1, "training.epochs and training.batch_size must be >= 1")
        require(t.learning_rate > 0 and t.proximal_mu >= 0, "training.learning_rate > 0, proximal_mu >= 0")
        p = self.privacy
        require(not p.enabled or self.server.aggregation == "mean",
                "privacy.enabled needs server.aggregation = \"mean\" (DP-FedAvg noises a clipped sum)")
        require(not p.enabled or p.fleet_size == 0 or p.fleet_size >= self.rounds.clients_per_round,
                "privacy.fleet_size must be 0 or >= rounds.clients_per_round")


def load_config(path: str | Path) -> AggregatorConfig:
    return load_toml(AggregatorConfig, path)
