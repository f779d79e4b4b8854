"""The main job: a whole federated training run on this machine, from partitioned data to a report."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.config import DEFAULT_ENCODING
from fedlite.aggregator.record import RoundRecord
from fedlite.dashboard.embed import start_for_demo
from fedlite.demo.cluster import (
    AGGREGATOR_USER,
    SIMULATED_KEEP_PROCESS_SECONDS,
    LocalFederation,
    agent_seed,
    follow_history,
    write_shard,
)
from fedlite.demo.datasets import Task, load_task
from fedlite.demo.partition import describe, format_description, from_file, partition
from fedlite.demo.report import format_progress, human_bytes, write_report
from fedlite.demo.scenario import Scenario, Vanisher, assign_roles
from fedlite.protocol import topics
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import RoundAnnouncement, from_json
from fedlite.protocol.signing import Verifier
from fedlite.protocol.transport import BrokerSettings, Link

FEDERATION = "demo"


@dataclass
class DemoPlan:
    task: str = "digits"
    clients: int = 10
    rounds: int = 40
    partition: str = "dirichlet"
    alpha: float = 0.5
    local_epochs: int = 3
    clients_per_round: int = 0  # 0: 60 % of the clients
    over_selection: float = 0.3
    deadline_seconds: float = 10.0
    centralized_epochs: int = 5
    seed: int = 0
    export_every: int = 1
    dp: bool = False  # DP-FedAvg: the aggregator's [privacy] section
    secagg: bool = False  # secure aggregation: the aggregator's [secure_aggregation] section
    noise_multiplier: float = 1.0
    clip_norm: float = 0.3
    codec: str = DEFAULT_ENCODING  # the update encoding of the training plan ([training] encoding)
    mode: str = "sync"  # [rounds] mode: sync | fedbuff (then `rounds` counts versions)
    stragglers: int = 0  # steady devices that train 5 x slower
    batch_seconds: float = 0.0  # simulated hardware: each training batch takes at least this long
    # the devices' learning rate decays this much per round (a round's cohort pulls the model less late in the run:
    # the last rounds' accuracy swings less with the cohort drawn)
    learning_rate_decay: float = 0.97
    aggregators: int = 1  # > 1: that many aggregator processes share the work (`aggregator.cluster`)
    lr: float = 0.0  # the devices' and the baseline's SGD learning rate (0: the task's)
    batch_size: int = 0  # 0: the task's
    hidden: list[int] = field(default_factory=list)  # mlp hidden sizes ([]: the task's)
    holdout: float = 0.2  # each device's held-out fraction
    devices: str = "realistic"  # realistic: busy, battery, metered and vanishing devices among them; steady: none
    partition_file: str = ""  # a JSON list of per-client index lists (instead of `partition`)


def run_demo(plan: DemoPlan, run_dir: Path, say: Any = print) -> dict[str, Any]:
    """Run the demo in `run_dir`; returns the summary written to run_dir/report/summary.json."""
    started = time.time()
    task = _with_overrides(load_task(plan.task, seed=plan.seed), plan)
    devices = [f"device-{i:02d}" for i in range(plan.clients)]
    say(f"fedlite demo: task {task.name} ({task.description}); {plan.clients} devices, {plan.rounds} rounds, "
        f"{plan.partition} partition" + (f" (alpha {plan.alpha})" if plan.partition == "dirichlet" else ""))
    shards = _write_data(task, plan, devices, run_dir / "data", say)
    with LocalFederation(run_dir, FEDERATION, devices) as fed:
        fed.start_broker()
        say(f"broker: Mosquitto on 127.0.0.1:{fed.broker.port} (aggregator) and TLS :{fed.broker.tls_port} "
            f"(devices), per-device credentials and ACLs in {fed.broker.paths.root}")
        roles = assign_roles(devices, plan.stragglers, realistic=plan.devices == "realistic")
        scenario = Scenario(fed, roles, {"batch_seconds": plan.batch_seconds} if plan.batch_seconds else {}).start()
        config = _aggregator_config(fed, task, plan, run_dir)
        if plan.aggregators > 1:  # before the agents: every member follows the first round
            aggregator = fed.start_aggregators(config, plan.aggregators)[0]
            say(f"aggregators: {plan.aggregators} processes on one federation, a1 coordinates, a2..a"
                f"{plan.aggregators} share the updates ($share group)")
        for device in devices:
            _start_agent(fed, device, shards[device], plan.holdout, plan.seed)
        if plan.aggregators == 1:
            aggregator = fed.start("aggregator", "aggregator", config)
        vanishing = [d for d, r in roles.items() if r.kind == "vanishing"]
        restart = lambda: _start_agent(fed, vanishing[0], shards[vanishing[0]], plan.holdout, plan.seed)  # noqa: E731
        vanisher = (Vanisher(fed, vanishing[0], restart,
                             at_round=max(2, plan.rounds // 3), say=say) if vanishing else None)
        observer = _observe_rounds(fed, vanisher)
        say(f"agents: {plan.clients} processes with simulated device state "
            f"({', '.join(sorted({r.kind for r in roles.values()}))}); aggregator started, exporting the model")
        dashboard = start_for_demo(run_dir / "aggregator", say)
        try:
            history = follow_history(fed, aggregator, 120 + plan.rounds * (plan.deadline_seconds + 30),
                                     lambda record: say(format_progress(record, plan.rounds) + _epsilon_note(record)))
        finally:
            observer.close()
            scenario.stop()
    try:
        return _finish(task, plan, run_dir, history, time.time() - started, say)
    finally:
        if dashboard is not None:
            dashboard.stop()


def _write_data(task: Task, plan: DemoPlan, devices: list[str], folder: Path, say: Any) -> dict[str, Path]:
    parts = (from_file(plan.partition_file, len(task.y_train), len(devices)) if plan.partition_file else
             partition(plan.partition, task.y_train, len(devices), np.random.default_rng(plan.seed), alpha=plan.alpha))
    say(format_description(describe(task.y_train, parts)))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "test.npz", x=task.x_test, y=task.y_test)  # held by the server only, for evaluation
    return {device: write_shard(folder / f"{device}.npz", task.x_train[part], task.y_train[part])
            for device, part in zip(devices, parts, strict=True)}


def _with_overrides(task: Task, plan: DemoPlan) -> Task:
    """The task with the plan's SGD settings and model options, for the federated run and the baseline alike."""
    options = task.options | ({"hidden": list(plan.hidden)} if plan.hidden else {})
    return dataclasses.replace(task, lr=plan.lr or task.lr, batch_size=plan.batch_size or task.batch_size,
                               options=options)


def _start_agent(fed: LocalFederation, device: str, shard: Path, holdout: float = 0.2, seed: int = 0) -> None:
    """An agent whose shuffles follow the demo's --seed (a run with the same seed repeats its devices' batches)."""
    fed.start(device, "agent", fed.agent_config(device, shard, data={"holdout_fraction": holdout},
                                                agent={"seed": agent_seed(seed, device),
                                                       "keep_process_seconds": SIMULATED_KEEP_PROCESS_SECONDS},
                                                personalization={"enabled": True}))


def clients_per_round(plan: DemoPlan) -> int:
    """K as the run uses it: the plan's, or 60 % of the clients."""
    return plan.clients_per_round or max(1, math.ceil(0.6 * plan.clients))


def _aggregator_config(fed: LocalFederation, task: Task, plan: DemoPlan, run_dir: Path) -> Path:
    per_round = clients_per_round(plan)
    return fed.aggregator_config(
        model={"arch": task.arch, "input_shape": list(task.input_shape), "classes": task.classes,
               "options": task.options, "seed": plan.seed, "export_every": plan.export_every},
        rounds={"total": plan.rounds, "clients_per_round": per_round, "over_selection": plan.over_selection,
                "quorum": max(1, per_round // 2), "deadline_seconds": plan.deadline_seconds,
                "wait_for_devices_seconds": 10.0, "status_ttl_seconds": 5.0, "seed": plan.seed, "mode": plan.mode,
                # FedBuff: half a round's updates per version, a round's devices training at once
                "fedbuff": {"buffer_size": max(1, per_round // 2), "max_concurrency": per_round,
                            "max_staleness": 4}},
        training={"epochs": plan.local_epochs, "batch_size": task.batch_size, "learning_rate": task.lr,
                  "encoding": plan.codec, "learning_rate_decay": plan.learning_rate_decay},
        evaluation={"test_data": str(run_dir / "data" / "test.npz")},
        **_privacy_table(plan), **fed.cluster_tables(plan.aggregators),
        # short key stages: the demo's vanishing and busy devices would otherwise hold each stage for 15 s
        **({"secure_aggregation": {"enabled": True, "stage_seconds": 5.0}} if plan.secagg else {}),
    )


def _privacy_table(plan: DemoPlan) -> dict[str, dict[str, Any]]:
    """The [privacy] section with --dp: every enrolled device counts towards the fleet size."""
    if not plan.dp:
        return {}
    return {"privacy": {"enabled": True, "clip_norm": plan.clip_norm, "noise_multiplier": plan.noise_multiplier,
                        "fleet_size": plan.clients}}


def _epsilon_note(record: RoundRecord | None) -> str:
    if record is None or record.epsilon is None:
        return ""
    return f"  ε {record.epsilon:.3g} at δ {record.delta or 0:g}"


def _observe_rounds(fed: LocalFederation, vanisher: Vanisher | None) -> Link:
    """Watch round announcements (as the operator would) to time the vanishing device mid-round."""

    verifier = Verifier.from_files([str(fed.signing_key.with_suffix(".pub"))])

    def on_message(topic: str, payload: bytes) -> None:
        if vanisher is None or not payload:
            return
        try:
            announcement = from_json(RoundAnnouncement, verifier.verify(topic, payload))
        except ProtocolError:
            return
        if announcement.state == "open":  # a selection (`closed` and `done` repeat or clear it)
            vanisher.on_round(announcement.round, announcement.selection)

    settings = BrokerSettings(host=fed.broker.host, port=fed.broker.port, username=AGGREGATOR_USER,
                              password=fed.passwords[AGGREGATOR_USER])
    link = Link(settings, "demo-observer", on_message)
    link.subscribe(topics.round_topic(FEDERATION))
    link.connect()
    return link


def _finish(task: Task, plan: DemoPlan, run_dir: Path, history: list[RoundRecord], seconds: float,
            say: Any) -> dict[str, Any]:
    from fedlite.aggregator.kpis import summarize
    from fedlite.demo.baseline import centralized_accuracy

    models = run_dir / "aggregator" / "models"
    say("centralized baseline: the same model trained on the pooled data")
    baseline = centralized_accuracy(task, plan.centralized_epochs, task.batch_size, task.lr, plan.seed,
                                    models / "round-00000")
    final = max((p for p in models.glob("round-*") if (p / "infer_int8.tflite").exists()), default=None)
    last = next((r for r in reversed(history) if r.complete), None)
    summary = write_report(run_dir / "report", history, centralized_accuracy=baseline, extra={
        "task": task.name, "plan": asdict(plan), "codec": plan.codec, "duration_seconds": round(seconds, 1),
        "clients": plan.clients, "clients_per_round": clients_per_round(plan), "partition": plan.partition,
        "alpha": plan.alpha, "params": _params(models),
        "mode": plan.mode, "stragglers": plan.stragglers, "aggregators": plan.aggregators,
        "updates_by_aggregator": _updates_by_aggregator(history),
        "int8_model": str(final / "infer_int8.tflite") if final else None,
        "trainable_model": str(final / "train.tflite") if final else None,
        "epsilon": last.epsilon if last else None, "delta": last.delta if last else None,
        "kpis": summarize(history), "secure_aggregation": plan.secagg, **_secure_costs(history),
    })
    say("")
    say(f"federated accuracy {summary['final_accuracy']:.3f}   centralized {baseline['accuracy']:.3f}   "
        f"after {summary['rounds']} rounds in {seconds:.0f} s" + _epsilon_note(last))
    say(f"bytes up {human_bytes(summary['bytes_up'])} ({plan.codec}, "
        f"{human_bytes(summary['bytes_up_per_update'] or 0)} per update), down {human_bytes(summary['bytes_down'])} "
        f"({human_bytes(summary['bytes_down_per_device_round'] or 0)} per device and round)")
    say(f"unanswered selections: {summary['timed_out']} timed out (deadline passed), {summary['cut_off']} cut off "
        "(the round had its K updates first: not needed)")
    if plan.secagg and "secure_device_bytes_up_per_round" in summary:
        say(f"secure aggregation: per device and round {human_bytes(summary['secure_device_bytes_up_per_round'])} "
            f"sent (masked input and key stages), {human_bytes(summary['secure_device_relay_bytes_per_round'])} of "
            f"relays received, {summary['secure_device_cpu_seconds_per_round'] * 1000:.0f} ms CPU on the stages")
    ab = (summary.get("kpis") or {}).get("personalization") or {}
    if ab.get("devices"):
        wins = round(ab["win_share"] * ab["devices"])
        say(f"personalized models (the head fine-tuned on each device) vs the global model on the devices' own "
            f"held-out data: mean gain {100 * ab['mean_gain']:+.1f} pt, better on {wins} of {ab['devices']} devices, "
            f"worst decile {100 * ab['gain_p10']:+.1f} pt")
    say(f"int8 inference model: {summary['int8_model']}")
    say(f"report: {run_dir / 'report'} (summary.json and plots)")
    return summary


def _secure_costs(history: list[RoundRecord]) -> dict[str, Any]:
    """Secure rounds: what the stages cost each participating device per round, in bytes (up: everything it sent;
    down: the relays) and in CPU seconds (keys, shares, masking; as the devices report it)."""
    rounds = [r for r in history if r.complete and r.secure_aggregation]
    if not rounds:
        return {}
    devices = sum(r.secure_aggregation["survivors"] + r.secure_aggregation["dropped"] for r in rounds)
    return {"secure_device_bytes_up_per_round": round(sum(r.bytes_up for r in rounds) / max(1, devices)),
            "secure_device_relay_bytes_per_round": round(sum(r.secure_aggregation.get("relay_bytes", 0)
                                                              for r in rounds) / max(1, devices)),
            "secure_device_cpu_seconds_per_round": round(sum(r.secure_aggregation.get("device_cpu_seconds", 0.0)
                                                             for r in rounds) / len(rounds), 4)}


def _updates_by_aggregator(history: list[RoundRecord]) -> dict[str, int]:
    """Updates each aggregator merged over the complete rounds (empty with one aggregator)."""
    totals: dict[str, int] = {}
    for record in history:
        if record.complete:
            for name, count in record.aggregators.items():
                totals[name] = totals.get(name, 0) + count
    return dict(sorted(totals.items()))


def _params(models: Path) -> int | None:
    """The model's parameter count, from the round-0 export's manifest."""
    try:
        return int(json.loads((models / "round-00000" / "manifest.json").read_text())["num_params"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
