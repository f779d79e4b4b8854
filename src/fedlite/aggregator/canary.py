"""The canary stage's rules: who gets a candidate first, whether their reports promote it, and its model frame."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

from fedlite.aggregator.registry import RegistryError
from fedlite.protocol.codec import Header, encode_model
from fedlite.protocol.manifest import INFER_INT8_FILE, MANIFEST_NAME


def pick_canaries(online: list[str], version: int, fraction: float, minimum: int) -> list[str]:
    """`fraction` of the online devices (at least `minimum`), the same ones for the same version."""
    count = min(len(online), max(minimum, math.ceil(fraction * len(online))))
    return sorted(random.Random(version).sample(online, count))


def judge(reports: dict[str, dict[str, Any]], margin: float) -> tuple[bool, str]:
    """Promote (True) or roll back, and why: mean candidate vs mean current accuracy over the canaries."""
    if not reports:
        return False, "no canary reported"
    paired = [r for r in reports.values() if r.get("accuracy_current") is not None]
    if not paired:
        mean = sum(r["accuracy_candidate"] for r in reports.values()) / len(reports)
        return True, f"candidate accuracy {mean:.3f} on {len(reports)} canaries with no model to compare against"
    candidate = sum(r["accuracy_candidate"] for r in paired) / len(paired)
    current = sum(r["accuracy_current"] for r in paired) / len(paired)
    ok = candidate >= current - margin
    relation = "within" if ok else "below"
    return ok, (f"candidate accuracy {candidate:.3f} vs current {current:.3f} on {len(paired)} canaries: "
                f"{relation} the margin of {margin:g}")


def model_frame(federation: str, entry: dict[str, Any]) -> bytes:
    """A version's int8 inference model as a `model` frame (blob + manifest), checked against its sha256."""
    folder = Path(entry["path"])
    blob = (folder / INFER_INT8_FILE).read_bytes()
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise RegistryError(f"{folder / INFER_INT8_FILE} no longer matches version {entry['version']}'s sha256")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    header = Header(kind="model", federation=federation, round=entry["version"], model_hash=manifest["model_hash"],
                    extra={"manifest": manifest, "version": entry["version"], "sha256": entry["sha256"]})
    return encode_model(blob, header)
