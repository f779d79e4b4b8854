"""The aggregator's TOML configuration: one federation, its model, rounds, strategy and broker."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fedlite.aggregator.kpis import KpiSettings
from fedlite.aggregator.strategies import registry
from fedlite.protocol import codecs
from fedlite.protocol.messages import TrainingPlan
from fedlite.protocol.topics import check_id
from fedlite.settings import (
    PORT,
    SEED,
    ConfigError,
    FieldRanges,
    Range,
    Tables,
    from_dict,
    load_toml,
    read_secret,
    read_toml,
    require,
)


@dataclass
class FederationSection:
    name: str
    state_dir: str = "/var/lib/fedlite-aggregator"

    def validate(self) -> None:
        check_id(self.name, "federation name")


@dataclass
class ModelSection:
    arch: str = "mlp"
    input_shape: list[Annotated[int, Range(ge=1)]] = field(default_factory=lambda: [64])
    classes: Annotated[int, Range(ge=2)] = 10
    options: dict = field(default_factory=dict)
    builder: str = ""  # "package.module:function" for a user's own architecture
    # a saved tf.keras model (.keras or .h5; relative to this file): arch, input_shape, classes, options and the
    # round-0 weights come from it
    keras: str = ""
    seed: Annotated[int, SEED] = 0
    downlink_dtype: str = "float32"  # the full weights' encoding: float32 | float16 | int8 (codecs.DOWNLINK)
    # the step between consecutive rounds' weights, for devices that hold the previous ones: an update codec, or none
    downlink_delta: str = "int4"  # by the codec study and the demo's accuracy guarantee (README, Codecs)
    # re-export TFLite models every N completed rounds
    export_every: Annotated[int, Range(ge=1, special=0, means="only at the end")] = 1

    def validate(self) -> None:
        require(bool(self.input_shape), "input_shape needs at least one size")
        require(not (self.keras and self.builder), "keras and builder exclude each other (a Keras model is its own "
                "architecture)")
        require(self.downlink_dtype in codecs.DOWNLINK,
                f"downlink_dtype must be one of {', '.join(codecs.DOWNLINK)}, not {self.downlink_dtype!r}")
        require(self.downlink_delta in ("none", *codecs.UPLINK),
                f"downlink_delta must be none or one of {', '.join(codecs.UPLINK)}, not {self.downlink_delta!r}")
        require(self.downlink_delta == "none" or self.downlink_dtype == "float32",
                "downlink_delta needs downlink_dtype = \"float32\" (deltas apply to exact weights); set "
                "downlink_delta = \"none\" to send lossy full weights")


def _orchestrator_configs() -> dict[str, type]:
    from fedlite.aggregator import orchestrators

    return orchestrators.config_types()


@dataclass
class RoundsSection:
    total: Annotated[int, Range(ge=1)] = 10
    clients_per_round: Annotated[int, Range(ge=1)] = 10  # K: the round closes once K updates are accepted
    # minimum accepted updates at the deadline
    quorum: Annotated[int, Range(ge=1, special=0, means="ceil(clients_per_round / 2)")] = 0
    over_selection: Annotated[float, Range(ge=0, le=5)] = 0.3  # select K * (1 + over_selection) devices
    deadline_seconds: Annotated[float, Range(gt=0)] = 60.0
    # how long to wait for K eligible devices before going with fewer (0: go with those there are)
    wait_for_devices_seconds: Annotated[float, Range(ge=0)] = 60.0
    # a round below quorum is retried this many times, then the run stops
    max_attempts: Annotated[int, Range(ge=1)] = 3
    status_ttl_seconds: Annotated[float, Range(gt=0)] = 90.0  # a device silent for longer is not selected
    seed: Annotated[int, SEED] = 0
    mode: str = "sync"  # a registered round orchestrator: sync | fedbuff | ...
    # [rounds.<mode>]: each orchestrator's own settings (e.g. [rounds.fedbuff] buffer_size); after loading, every
    # registered orchestrator that has settings has its table
    orchestrators: Annotated[dict[str, Any], Tables(_orchestrator_configs, what="rounds mode")] = field(
        default_factory=dict)

    def __post_init__(self) -> None:
        self.orchestrators = {name: kind() for name, kind in _orchestrator_configs().items()} | self.orchestrators

    def validate(self) -> None:
        from fedlite.aggregator import orchestrators

        known = orchestrators.names()
        require(self.mode in known, f"mode must be one of {', '.join(known)}, not {self.mode!r}")
        require(self.quorum <= self.clients_per_round,
                f"quorum must be <= clients_per_round ({self.clients_per_round}), not {self.quorum}")

    @property
    def min_accepted(self) -> int:
        return self.quorum or -(-self.clients_per_round // 2)


@dataclass
class ServerSection:
    optimizer: str = "fedavg"  # a registered server optimizer: fedavg | fedavgm | fedadam | fedyogi | ...
    learning_rate: Annotated[float, Range(gt=0)] = 1.0  # the server learning rate, of every optimizer
    aggregation: str = "mean"  # a registered reducer: mean | trimmed_mean | median | ...
    # [server.<name>]: each registered strategy's own settings (its config dataclass), e.g. [server.fedadam] beta1;
    # after loading, every registered name has its table (defaults where the file gives none)
    strategies: Annotated[dict[str, Any], Tables(registry.config_types, what="strategy",
                                                 set_by={"server_lr": "learning_rate"})] = field(default_factory=dict)
    max_update_norm: Annotated[float, Range(gt=0, special=0, means="no bound")] = 0.0
    norm_policy: str = "clip"  # clip | reject
    max_update_bytes: Annotated[int, Range(ge=1)] = 64 * 1024 * 1024
    max_examples: Annotated[int, Range(ge=1)] = 1_000_000  # per update; more is refused
    max_abs_value: Annotated[float, Range(gt=0)] = 1e3  # per delta entry; larger is refused
    # One device's influence (see `fedlite.aggregator.influence`): weight cap, adaptive norm bound, step bound.
    example_multiple: Annotated[float, Range(ge=1)] = 2.0  # weight <= this x the selected devices' median count
    norm_multiple: Annotated[float, Range(ge=1, special=0, means="off")] = 2.0  # clip to this x recent median norm
    norm_refuse_multiple: Annotated[float, Range(ge=1, special=0, means="only clip")] = 10.0  # refuse beyond this
    norm_window: Annotated[int, Range(ge=1)] = 5  # complete rounds whose accepted norms form that median
    norm_warmup: Annotated[int, Range(ge=1)] = 3  # with no such rounds, updates held until this many set a bound
    max_step_ratio: Annotated[float, Range(ge=0)] = 1.0  # refuse a step longer than this x the weights' norm (0: off)

    def __post_init__(self) -> None:
        tables = {name: kind() for name, kind in registry.config_types().items()} | self.strategies
        self.strategies = {name: _with_server_lr(table, self.learning_rate) for name, table in tables.items()}

    def validate(self) -> None:
        require(self.norm_refuse_multiple == 0 or self.norm_refuse_multiple >= self.norm_multiple,
                f"norm_refuse_multiple must be 0 (never) or >= norm_multiple ({self.norm_multiple:g})")
        optimizers, reducers = registry.optimizer_names(), registry.reducer_names()
        require(self.optimizer in optimizers,
                f"optimizer must be one of {', '.join(optimizers)}, not {self.optimizer!r}")
        require(self.aggregation in reducers,
                f"aggregation must be one of {', '.join(reducers)}, not {self.aggregation!r}")
        require(self.norm_policy in ("clip", "reject"), "norm_policy must be clip or reject")


def _with_server_lr(table: Any, learning_rate: float) -> Any:
    if any(f.name == "server_lr" for f in dataclasses.fields(table)):
        return dataclasses.replace(table, server_lr=learning_rate)
    return table


@dataclass
class BrokerSection:
    host: str = "127.0.0.1"
    port: Annotated[int, PORT] = 1883
    tls: bool = False
    ca_file: str = ""
    username: str = "aggregator"
    password: str = ""
    password_file: str = ""
    share_group: str = ""  # MQTT v5 shared subscription group for several aggregators

    def validate(self) -> None:
        if self.share_group:
            check_id(self.share_group, "share_group")

    def resolve_password(self) -> str | None:
        return read_secret(self.password, self.password_file, "broker password_file")


@dataclass
class EvaluationSection:
    test_data: str = ""  # .npz with x and y: a server-held test set
    calibration_examples: Annotated[int, Range(ge=1)] = 200  # examples of it used to calibrate the int8 inference model


@dataclass
class MetricsSection:
    prometheus_port: Annotated[int, Range(ge=1, le=65535, special=0, means="no endpoint")] = 0
    prometheus_host: str = "127.0.0.1"


@dataclass
class SigningSection:
    key_file: str = ""  # Ed25519 private key (PEM) that signs every broadcast; make one with `fedlite keys`


@dataclass
class PrivacySection:
    """DP-FedAvg (see `strategies.dp`): clip each update to clip_norm, add N(0, (noise_multiplier * clip_norm)^2)."""

    enabled: bool = False
    clip_norm: Annotated[float, Range(gt=0)] = 1.0  # S: the L2 bound of each device's update
    noise_multiplier: Annotated[float, Range(gt=0)] = 1.0  # z: noise std on the sum, in units of clip_norm
    delta: Annotated[float, Range(gt=0, lt=1)] = 1e-5  # the δ at which ε is reported; well below 1 / fleet size
    # N for the sampling rate q = selected / N
    fleet_size: Annotated[int, Range(ge=1, special=0, means="the devices the aggregator has heard from")] = 0
    # noise seed (reproducible, for tests); unseeded noise is drawn from the OS CSPRNG
    seed: Annotated[int, Range(ge=0, special=-1, means="unseeded noise")] = -1
    # the privacy budget: no round starts that would take ε (at `delta`) beyond it; training then stops
    max_epsilon: Annotated[float, Range(gt=0, special=0, means="no budget")] = 0.0


@dataclass
class SecureAggregationSection:
    """SecAgg+ (see `protocol.secagg`): the aggregator learns only the sum of each round's updates."""

    enabled: bool = False
    # t, as a fraction of each device's neighbours: shares needed to rebuild a secret (> 0.5 bounds a server lying
    # about drop-outs)
    threshold: Annotated[float, Range(gt=0.5, le=1)] = 0.6
    neighbours: Annotated[int, Range(ge=2, special=0, means="2 ceil(1.5 log2 N), all pairs at N <= 10")] = 0
    levels: Annotated[int, Range(ge=1)] = 64  # L: a coordinate in [-B, B] becomes an integer in [-L, L]
    # C of round 1; later rounds use clip_multiple x the previous round's mean norm (without privacy)
    clip_norm: Annotated[float, Range(gt=0)] = 5.0
    clip_multiple: Annotated[float, Range(ge=1, special=0, means="clip_norm in every round")] = 2.0
    coordinate_bound: Annotated[float, Range(gt=0)] = 3.0  # B = this x C / sqrt(block) (rotated coordinates)
    stage_seconds: Annotated[float, Range(gt=0)] = 15.0  # each key stage's deadline (and the unmask stage's)


@dataclass
class RolloutSection:
    """Staged rollout of registry versions to the fleet (see `fedlite.aggregator.rollout`)."""

    # of the online devices that get a promoted candidate first
    canary_fraction: Annotated[float, Range(gt=0, le=1)] = 0.3
    min_canaries: Annotated[int, Range(ge=1)] = 1
    # promote when mean candidate accuracy >= mean current accuracy - margin
    margin: Annotated[float, Range(ge=0, le=1)] = 0.02
    # decide with the reports so far (at least one) after this long
    timeout_seconds: Annotated[float, Range(gt=0)] = 60.0
    serve_after_rounds: bool = False  # keep running after the last round, serving rollouts until stopped


@dataclass
class ClusterSection:
    """Several aggregators on one federation (see `fedlite.aggregator.cluster`): each runs with its own `member`
    name, the same file otherwise, and one state_dir on storage they share."""

    member: str = ""  # this aggregator's name among the federation's ("": it is the only one)
    partial_timeout_seconds: Annotated[float, Range(gt=0)] = 10.0  # the coordinator's wait for partial sums
    claim_timeout_seconds: Annotated[float, Range(gt=0)] = 5.0  # a member's wait for a grant
    lease_poll_seconds: Annotated[float, Range(gt=0)] = 1.0  # how often a member tries to take over coordination
    # an edge site's aggregator: a member on its site's broker (bridged to the central one) that never coordinates
    site: bool = False

    def validate(self) -> None:
        if self.member:
            check_id(self.member, "cluster member")
        require(not self.site or bool(self.member), "cluster.site needs cluster.member (the site's name, which its "
                "bridge account on the central broker has)")


DEFAULT_ENCODING = "int4"  # by the codec study (benchmarks/codec_study.py, README)


@dataclass
class TrainingSection(TrainingPlan):
    """[training]: the plan broadcast to the devices (a protocol message), with the configuration's default codec."""

    encoding: str = DEFAULT_ENCODING  # int8 | int8-tensor | int4 | ternary-ef (fedlite.protocol.codecs)
    # the devices' learning rate is multiplied by this each round: round r trains at learning_rate * decay^(r - 1)
    learning_rate_decay: Annotated[float, Range(gt=0, le=1)] = 1.0

    def validate(self) -> None:
        codecs.check_encoding(self.encoding, "update")

    def plan(self, number: int) -> TrainingPlan:
        """The plan broadcast for round (or version) `number`: the plan's fields alone, its learning rate decayed."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingPlan)}
        fields["learning_rate"] = self.learning_rate * self.learning_rate_decay ** max(0, number - 1)
        return TrainingPlan(**fields)


# [training] is the plan broadcast to the devices (a protocol message); its bounds as configuration:
TRAINING_RANGES = FieldRanges(
    epochs=Range(ge=1),
    batch_size=Range(ge=1),
    learning_rate=Range(gt=0),
    proximal_mu=Range(ge=0),
    max_examples=Range(ge=1, special=0, means="all local examples"),
    max_staleness=Range(ge=0),
)


@dataclass
class AggregatorConfig:
    federation: FederationSection
    model: ModelSection = field(default_factory=ModelSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    training: Annotated[TrainingSection, TRAINING_RANGES] = field(default_factory=TrainingSection)
    server: ServerSection = field(default_factory=ServerSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    signing: SigningSection = field(default_factory=SigningSection)
    kpis: KpiSettings = field(default_factory=KpiSettings)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    secure_aggregation: SecureAggregationSection = field(default_factory=SecureAggregationSection)

    def validate(self) -> None:
        self._validate_cluster()
        self._validate_secure()
        p = self.privacy
        require(not p.enabled or self.server.aggregation == "mean",
                "privacy.enabled needs server.aggregation = \"mean\" (DP-FedAvg noises a clipped sum)")
        require(not p.enabled or p.fleet_size == 0 or p.fleet_size >= self.rounds.clients_per_round,
                "privacy.fleet_size must be 0 or >= rounds.clients_per_round")
        if self.rounds.mode == "fedbuff":  # a version's updates come from different versions, scaled by staleness
            require(self.server.aggregation == "mean", "rounds.mode = \"fedbuff\" needs server.aggregation = "
                    "\"mean\" (trimmed mean and median rank one round's cohort; a buffer of stale, rescaled updates "
                    "is not one)")
            require(not p.enabled, "rounds.mode = \"fedbuff\" cannot be combined with privacy.enabled yet (the "
                    "accountant assumes each round samples its devices at random; asynchronous slots do not)")


    def _validate_secure(self) -> None:
        """What secure aggregation cannot do: anything that needs to see one device's update."""
        if not self.secure_aggregation.enabled:
            return
        need = "secure_aggregation.enabled (the aggregator sees only the sum) cannot be combined with"
        require(self.server.aggregation == "mean", f"{need} server.aggregation = {self.server.aggregation!r} "
                "(trimmed mean and median rank individual updates): use \"mean\"")
        require(self.rounds.mode == "sync", f"{need} rounds.mode = {self.rounds.mode!r} (each stage waits for "
                "one cohort): use \"sync\"")
        require(not self.cluster.member, f"{need} cluster.member (a sum of masked inputs cannot be split among "
                "aggregators)")
        require(not self.kpis.exclude_flagged, f"{need} kpis.exclude_flagged (anomaly flags need each update's "
                "norm and direction)")
        most = self.rounds.clients_per_round  # a round sums at most K masked inputs
        bits = math.ceil(math.log2(2 * most * self.secure_aggregation.levels + 1))
        require(bits <= 32, f"secure_aggregation.levels = {self.secure_aggregation.levels} with {most} inputs per "
                f"round needs {bits}-bit sums (at most 32): lower the levels")

    def _validate_cluster(self) -> None:
        if not self.cluster.member:
            return
        need = "cluster.member (several aggregators) needs"
        require(self.cluster.site or bool(self.broker.share_group),
                f"{need} broker.share_group (the shared subscription they split)")
        require(bool(self.signing.key_file), f"{need} signing.key_file (aggregators sign what they tell each other)")
        require(self.rounds.mode == "sync", f"{need} rounds.mode = \"sync\" (fedbuff runs on one aggregator)")
        require(self.server.aggregation == "mean", f"{need} server.aggregation = \"mean\" (a partial sum merges "
                "exactly; trimmed mean and median rank every update in one place)")


def load_config(path: str | Path, member: str = "") -> AggregatorConfig:
    """The configuration in `path`; `member` sets [cluster] member (several aggregators sharing one file). A
    `[model] builder` is found as `fedlite export` finds it (`model_export.builders`), from the file's directory,
    and kept in a form that resolves from anywhere; so is a `[model] keras` file, whose model sets the architecture."""
    if not member:
        config = load_toml(AggregatorConfig, path)
    else:
        raw = read_toml(path)
        raw.setdefault("cluster", {})["member"] = member
        config = from_dict(AggregatorConfig, raw, str(path))
    if config.model.builder:
        from fedlite.model_export.builders import BuilderError, canonical

        try:
            config.model.builder = canonical(config.model.builder, Path(path).resolve().parent)
        except BuilderError as exc:
            raise ConfigError(f"{path}: model.builder: {exc}") from None
    if config.model.keras:
        from fedlite.aggregator.keras_model import resolve

        resolve(config.model, Path(path).resolve().parent, str(path))
    return config
