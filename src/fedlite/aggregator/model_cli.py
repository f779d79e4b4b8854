"""`fedlite model`: the model registry of an aggregator state directory: list, show, promote, rollback.

`list` and `show` read registry.json (registering finished exports first). `promote` and `rollback` queue
a request in registry.json for the rollout manager inside the running `fedlite aggregator` (which keeps
serving after its last round with ``[rollout] serve_after_rounds = true``), then wait for it to be taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any

DEFAULT_STATE_DIR = "/var/lib/fedlite-aggregator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", required=True, metavar="list|show|promote|rollback")
    for name, help_ in (("list", "versions with accuracy, sha256, what is deployed, and the rollout"),
                        ("show", "one version in detail"),
                        ("promote", "start a staged rollout of a version (canaries first)"),
                        ("rollback", "deploy a version (default: the previously deployed one) to every device")):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the aggregator's [federation] state_dir")
        if name in ("show", "promote"):
            sub.add_argument("version", type=int, help="the registry's version number (see `fedlite model list`)")
        if name == "rollback":
            sub.add_argument("version", type=int, nargs="?",
                             help="the version to deploy (default: the previously deployed one)")
        if name in ("promote", "rollback"):
            sub.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the aggregator to act")
            sub.add_argument("--queue", action="store_true",
                             help="queue the request even when no aggregator is serving rollouts right now")
        if name in ("list", "show"):
            sub.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlite.aggregator.registry import Registry, RegistryError
    from fedlite.fsutil import StorageError

    if not Path(args.state_dir).is_dir():
        print(f"fedlite model: no aggregator state directory at {args.state_dir} (--state-dir: the aggregator's "
              "[federation] state_dir)", file=sys.stderr)
        return 2
    registry = Registry(args.state_dir)
    try:
        _sync(registry)
        if args.command == "list":
            return _list(registry, args.json)
        if args.command == "show":
            return _show(registry, args.version, args.json)
        return _request(registry, args.command, args.version, args.wait, args.queue)
    except (RegistryError, StorageError) as exc:
        print(f"fedlite model: {exc}", file=sys.stderr)
        return 2


def _sync(registry: Any) -> None:
    """Register finished exports; read-only users (not the aggregator's account) just read what is there."""
    from fedlite.fsutil import StorageError

    with contextlib.suppress(PermissionError, StorageError):
        registry.sync()


def _list(registry: Any, as_json: bool) -> int:
    state = registry.read()
    if as_json:
        print(json.dumps(state, indent=1))
        return 0
    rollout = state["rollout"] or {}
    print(f"{'version':>7}  {'accuracy':>8}  {'loss':>7}  {'sha256':<12}  {'created':<19}  status")
    for v in state["versions"]:
        print(f"{v['version']:>7}  {_num(v['accuracy']):>8}  {_num(v['loss']):>7}  {v['sha256'][:12]:<12}  "
              f"{_when(v['created_at']):<19}  {_marks(v['version'], state['deployed'], rollout)}")
    if not state["versions"]:
        print(f"(no versions yet in {registry.path})")
    print(f"deployed: {state['deployed'] if state['deployed'] is not None else 'nothing'}")
    if rollout:
        print(f"rollout: version {rollout['candidate']} {rollout['state']} ({rollout['reason']})")
    pending = [r for r in state["requests"] if r["state"] == "pending"]
    if pending:
        print(f"pending requests: {', '.join(_describe(r) for r in pending)}")
    return 0


def _show(registry: Any, version: int, as_json: bool) -> int:
    from pathlib import Path

    state = registry.read()
    entry = registry.version(version)
    detail = dict(entry)
    try:
        manifest = json.loads((Path(entry["path"]) / "manifest.json").read_text())
        detail["infer_int8"] = manifest["files"]["infer_int8"]
        detail["model_hash"] = manifest["model_hash"]
    except (OSError, ValueError, KeyError):
        detail["infer_int8"] = None
    detail["deployed"] = state["deployed"] == version
    rollout = state["rollout"]
    detail["rollout"] = rollout if rollout and version in (rollout["candidate"], rollout["previous"]) else None
    if as_json:
        print(json.dumps(detail, indent=1))
        return 0
    for line in _readable(detail):
        print(line)
    return 0


def _readable(values: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: value` lines a person reads: times as dates, numbers rounded, nested tables as dotted keys."""
    lines = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += _readable(value, f"{name}.") if value else [f"{name}: -"]
        elif isinstance(value, list):
            lines.append(f"{name}: {', '.join(map(str, value)) if value else '-'}")
        elif value is None:
            lines.append(f"{name}: -")
        elif isinstance(value, bool):
            lines.append(f"{name}: {'yes' if value else 'no'}")
        elif key.endswith("_at") and isinstance(value, int | float):
            lines.append(f"{name}: {_when(float(value))}")
        elif isinstance(value, float):
            lines.append(f"{name}: {value:.6g}")
        else:
            lines.append(f"{name}: {value}")
    return lines


def _request(registry: Any, action: str, version: int | None, wait: float, queue_anyway: bool) -> int:
    if version is not None:
        registry.version(version)  # unknown version: a clear error before anything is queued
    if not registry.server_alive() and not queue_anyway:
        print(f"fedlite model: no aggregator is serving rollouts for {registry.state_dir} (start `fedlite "
              "aggregator`; set [rollout] serve_after_rounds = true to keep it serving after its last round), "
              "or pass --queue to leave the request for the next start", file=sys.stderr)
        return 1
    entry = registry.request(action, version)
    end = time.time() + wait
    while time.time() < end:
        current = registry.find_request(entry["id"])
        if current is None or current["state"] != "pending":
            break
        time.sleep(0.2)
    current = registry.find_request(entry["id"]) or entry
    if current["state"] == "pending":
        print(f"queued: {_describe(current)} (request {current['id']}); not taken yet")
        return 0
    ok = current["state"] == "done"
    print(f"{_describe(current)}: {current['message']}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _marks(version: int, deployed: int | None, rollout: dict[str, Any]) -> str:
    marks = ["deployed"] if version == deployed else []
    if rollout.get("candidate") == version:
        marks.append({"canary": "canary", "promoted": "promoted", "rolled_back": "rolled back"}[rollout["state"]])
    return ", ".join(marks)


def _describe(request: dict[str, Any]) -> str:
    return f"{request['action']} {request['version'] if request['version'] is not None else '(previous)'}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
