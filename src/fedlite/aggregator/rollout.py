"""Staged rollout of registry versions: canaries first, then the whole fleet or an automatic rollback.

The `RolloutManager` runs as a thread in the aggregator process. Every tick it registers newly exported
versions, takes the operator's requests from registry.json's queue (written by `fedlite model`), records
the canaries' ``deployed`` reports and decides a rollout in its canary stage:

- ``promote V``: with nothing deployed yet, V goes to every device at once. Otherwise a
  ``canary_fraction`` of the online devices (at least ``min_canaries``) get V while the rest keep the
  deployed version. When every canary has reported, or at ``timeout_seconds`` with at least one report,
  the mean candidate accuracy is compared with the mean accuracy of the model it replaced on the same
  devices: at least current - ``margin`` promotes V to every device; below it rolls back (every canary
  reinstalls the deployed version). No report at the timeout is a rollback too.
- ``rollback [V]``: V (default: the version deployed before the current one) to every device at once; a
  canary stage in progress is abandoned.

Each decision publishes a signed, retained `DeployInstruction` on the deploy topic, after the signed,
retained int8 model frames it names (``fl/<federation>/model/<sha256>``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fedlite.aggregator.canary import judge, model_frame, pick_canaries
from fedlite.aggregator.config import RolloutSection
from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.registry import Registry, RegistryError, find_version
from fedlite.fsutil import StorageError
from fedlite.protocol import topics
from fedlite.protocol.messages import CanaryTarget, DeployInstruction, DeployTarget, DeviceReport, to_json

log = logging.getLogger("fedlite.aggregator.rollout")

Publish = Callable[[str, bytes], None]  # signs and publishes retained (Aggregator._broadcast)
TICK_SECONDS = 0.25
HEARTBEAT_SECONDS = 2.0
REPORT_SKEW_SECONDS = 5.0  # a canary's report may carry a clock slightly behind the aggregator's


class RolloutManager:
    def __init__(self, config: RolloutSection, registry: Registry, federation: str, fleet: Fleet,
                 publish: Publish, on_storage_failure: Callable[[StorageError], None] | None = None) -> None:
        self.config = config
        self.on_storage_failure = on_storage_failure
        self.registry = registry
        self.federation = federation
        self.fleet = fleet
        self.publish = publish
        self._reports: queue.Queue[DeviceReport] = queue.Queue()
        self._published: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="rollout", daemon=True)
        self._last_beat = 0.0

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def on_report(self, report: DeviceReport) -> None:
        """A device's ``deployed`` report (network thread): handled on the manager's thread."""
        self._reports.put(report)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except StorageError as exc:  # registry.json cannot be written: the aggregator stops (exit code 3)
                if self.on_storage_failure is None:
                    raise
                self.on_storage_failure(exc)
                return
            except Exception:  # a bad request or a broker hiccup must not end rollouts for good
                log.exception("rollout manager error")
            self._stop.wait(TICK_SECONDS)

    def tick(self, now: float | None = None) -> None:
        now = now or time.time()
        if now - self._last_beat >= HEARTBEAT_SECONDS:
            self.registry.beat()
            self._last_beat = now
        for version in self.registry.sync():
            log.info("registered version %d", version)
        self._take_reports()
        self._serve_requests()
        self._decide_canary(now)

    # --- requests -------------------------------------------------------------------------------

    def _serve_requests(self) -> None:
        for request in self.registry.read()["requests"]:
            if request["state"] != "pending":
                continue
            try:
                message, ok = self._serve(request), True
            except StorageError:
                raise
            except (RegistryError, OSError, ValueError) as exc:
                message, ok = str(exc), False
            log.log(logging.INFO if ok else logging.WARNING, "request %s %s %s: %s", request["action"],
                    request["version"] if request["version"] is not None else "(previous)", "done" if ok else "failed",
                    message)
            with self.registry.edit() as state:
                for entry in state["requests"]:
                    if entry["id"] == request["id"]:
                        entry.update(state="done" if ok else "failed", message=message, handled_at=time.time())

    def _serve(self, request: dict[str, Any]) -> str:
        if request["action"] == "promote":
            return self.promote(int(request["version"]))
        return self.rollback(request["version"])

    def promote(self, version: int) -> str:
        state = self.registry.read()
        find_version(state, version)
        rollout, deployed = state["rollout"], state["deployed"]
        if rollout and rollout["state"] == "canary":
            raise RegistryError(f"version {rollout['candidate']} is in its canary stage; wait for it to finish "
                                "or roll back first")
        if deployed == version:
            raise RegistryError(f"version {version} is already deployed")
        if deployed is None:
            self._deploy(stable=version)
            self._record(version, None, [], "promoted", "first deployment: nothing to compare against",
                         deployed=version)
            self.registry.log_deployment(version, "promote")
            return f"version {version} deployed to every device (first deployment)"
        online = self._online()
        if not online:
            raise RegistryError("no online devices to run canaries on")
        canaries = self._pick_canaries(online, version)
        self._deploy(stable=deployed, canary=version, devices=canaries)
        self._record(version, deployed, canaries, "canary",
                     f"canary on {len(canaries)} of {len(online)} online devices", finished=False)
        return f"version {version} on canaries {', '.join(canaries)}; version {deployed} stays on the others"

    def rollback(self, version: int | None) -> str:
        state = self.registry.read()
        deployed, rollout = state["deployed"], state["rollout"]
        if version is None:
            version = self.registry.previously_deployed(deployed)
            if version is None:
                raise RegistryError("no previously deployed version to roll back to: name one")
        find_version(state, version)
        in_canary = bool(rollout and rollout["state"] == "canary")
        rejected = rollout["candidate"] if in_canary else deployed
        self._deploy(stable=version)
        self._record(rejected, version, rollout["canaries"] if in_canary else [], "rolled_back",
                     f"manual rollback to version {version}", deployed=version,
                     reports=rollout["reports"] if in_canary else {})
        self.registry.log_deployment(version, "rollback")
        return f"version {version} deployed to every device (rollback from {rejected})"

    # --- the canary stage -----------------------------------------------------------------------

    def _take_reports(self) -> None:
        while True:
            try:
                report = self._reports.get_nowait()
            except queue.Empty:
                return
            self._take_report(report)

    def _take_report(self, report: DeviceReport) -> None:
        metrics = report.metrics
        log.info("%s deployed version %d: %s (candidate %s, replaced %s)", report.client_id, report.round,
                 report.reason, _fmt(metrics.get("accuracy_candidate")), _fmt(metrics.get("accuracy_current")))
        with self.registry.edit() as state:
            rollout = state["rollout"]
            if (not rollout or rollout["state"] != "canary" or report.round != rollout["candidate"]
                    or report.client_id not in rollout["canaries"]
                    or report.sent_at < rollout["started_at"] - REPORT_SKEW_SECONDS
                    or "accuracy_candidate" not in metrics):
                return
            rollout["reports"][report.client_id] = {"accuracy_candidate": float(metrics["accuracy_candidate"]),
                                                    "accuracy_current": metrics.get("accuracy_current")}

    def _decide_canary(self, now: float) -> None:
        rollout = self.registry.read()["rollout"]
        if not rollout or rollout["state"] != "canary":
            return
        reports = rollout["reports"]
        all_in = set(rollout["canaries"]) <= set(reports)
        if not all_in and now - rollout["started_at"] < self.config.timeout_seconds:
            return
        candidate, previous = rollout["candidate"], rollout["previous"]
        promote, reason = judge(reports, self.config.margin)
        if not all_in:
            reason += f" (timeout: {len(reports)} of {len(rollout['canaries'])} canaries reported)"
        if promote:
            self._deploy(stable=candidate)
            self._finish("promoted", reason, deployed=candidate)
            self.registry.log_deployment(candidate, "canary-promote")
        else:
            self._deploy(stable=previous)
            self._finish("rolled_back", reason, deployed=previous)
        log.info("version %d %s: %s", candidate, "promoted to every device" if promote else
                 f"rolled back to version {previous}", reason)

    # --- publishing and recording ---------------------------------------------------------------

    def _deploy(self, stable: int | None, canary: int | None = None, devices: list[str] | None = None) -> None:
        state = self.registry.read()
        stable_target = self._target(state, stable) if stable is not None else None
        canary_target = None
        if canary is not None:
            t = self._target(state, canary)
            canary_target = CanaryTarget(t.version, t.sha256, t.model_topic, sorted(devices or []))
        instruction = DeployInstruction(federation=self.federation, deployment_id=uuid.uuid4().hex[:12],
                                        stable=stable_target, canary=canary_target, issued_at=time.time())
        self.publish(topics.deploy_topic(self.federation), to_json(instruction))
        log.info("deployment %s: stable %s, canary %s on %s", instruction.deployment_id, stable, canary, devices or [])

    def _target(self, state: dict[str, Any], version: int) -> DeployTarget:
        """The version's model frame published (once per process), and its target."""
        entry = find_version(state, version)
        topic = topics.model_topic(self.federation, entry["sha256"])
        if entry["sha256"] not in self._published:
            self.publish(topic, model_frame(self.federation, entry))
            self._published.add(entry["sha256"])
        return DeployTarget(version=version, sha256=entry["sha256"], model_topic=topic)

    def _record(self, candidate: int | None, previous: int | None, canaries: list[str], status: str, reason: str,
                *, deployed: int | None = None, finished: bool = True, reports: dict | None = None) -> None:
        now = time.time()
        with self.registry.edit() as state:
            state["rollout"] = {"candidate": candidate, "previous": previous, "canaries": canaries,
                                "reports": dict(reports or {}), "state": status, "started_at": now,
                                "finished_at": now if finished else None, "reason": reason}
            if deployed is not None:
                state["deployed"] = deployed

    def _finish(self, status: str, reason: str, deployed: int | None) -> None:
        with self.registry.edit() as state:
            state["rollout"].update(state=status, reason=reason, finished_at=time.time())
            state["deployed"] = deployed

    def _online(self) -> list[str]:
        now = time.time()
        return sorted(cid for cid, view in self.fleet.snapshot().items()
                      if view.status.state in ("online", "training") and self.fleet.fresh(view, now))

    def _pick_canaries(self, online: list[str], version: int) -> list[str]:
        return pick_canaries(online, version, self.config.canary_fraction, self.config.min_canaries)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"
