"""Shared helpers for the benchmarks: memory probes, child processes, data, exported models, Flower detection."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
BENCH_PYTHON = Path(os.environ.get("BENCH_VENV", ROOT / ".venv-bench")) / "bin" / "python"
MIB = 1024 * 1024

# The models the benchmarks use: (label, arch, input shape, options).
MODELS: dict[str, tuple[str, tuple[int, ...], dict[str, Any]]] = {
    "mlp": ("mlp", (64,), {"hidden": [64, 32]}),  # the demo's digits MLP
    "mlp100k": ("mlp", (64,), {"hidden": [384, 192]}),  # a >= 100k-parameter MLP on the same data
    "cnn": ("cnn", (8, 8, 1), {}),  # the 8x8 CNN on digits (filters 8, 16; dense 32)
}


# --- memory -------------------------------------------------------------------------------------


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not getrusage's ru_maxrss: after fork + exec that also
    carries the parent's peak, so a child of a large parent would report the parent's size."""
    return proc_status()["VmHWM"]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


# --- child processes ----------------------------------------------------------------------------


def run_child(script: Path, args: Sequence[str], python: str | Path | None = None, timeout: float = 900) -> Any:
    """Run `python script args...` and return the JSON on its last stdout line."""
    cmd = [str(python or sys.executable), str(script), *map(str, args)]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def emit(result: Any) -> None:
    """A child's answer: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """min / median / max, rounded."""
    return {"min": round(min(values), digits), "median": round(median(values), digits),
            "max": round(max(values), digits)}


def simulate(args: Sequence[str], timeout: float = 1200) -> dict[str, Any]:
    """`fedlite simulate ARGS --json` in a temporary run dir: its JSON summary (RuntimeError with its output if it
    fails)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedlite-simulate-") as run_dir:
        cmd = [str(MAIN_PYTHON), "-m", "fedlite.cli", "simulate", *args, "--json", "--run-dir", run_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fedlite simulate exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}")
    return json.loads(lines[-1])


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# --- Flower -------------------------------------------------------------------------------------


def flower_version() -> str | None:
    """The installed flwr version, or None when Flower is not in this environment."""
    import importlib.metadata as md

    try:
        return md.version("flwr")
    except md.PackageNotFoundError:
        return None


# --- data and models ----------------------------------------------------------------------------


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's bundled digits scaled to [0, 1]: stratified 75/25 split (as the tests and the demo use)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, stratify=digits.target,
                                                        random_state=seed)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Dirichlet label-skew partition: fedlite.demo.partition's when present, else a local equivalent."""
    try:
        from fedlite.demo.partition import dirichlet as demo_dirichlet

        return [np.asarray(part) for part in demo_dirichlet(labels, clients, alpha, rng)]
    except ImportError:
        return _dirichlet_local(labels, clients, alpha, rng)


def _dirichlet_local(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
                     min_size: int = 10) -> list[np.ndarray]:
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for part, piece in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError("no Dirichlet partition with enough examples per client")


def cached(out: Path) -> bool:
    """Whether `out` holds an export with this exporter's signatures (an older one, e.g. without train_plain, is
    exported again)."""
    import json

    from fedlite.protocol.manifest import signature_specs

    try:
        m = json.loads((out / "manifest.json").read_text())
        return m["signatures"] == signature_specs(m["input"]["shape"], m["classes"], m["num_params"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def export(model: str, cache: Path) -> Path:
    """Export one of MODELS, or ``task-<name>`` (a demo task's model), into cache/<model> (once); its directory."""
    out = cache / model
    if cached(out):
        return out
    import contextlib
    import io

    from fedlite.model_export.convert import export_model

    if model.startswith("task-"):  # a demo task's model (fedlite.demo.datasets), e.g. task-health
        from fedlite.demo.datasets import load_task

        task = load_task(model.removeprefix("task-"))
        with contextlib.redirect_stdout(io.StringIO()):
            export_model(task.arch, task.input_shape, task.classes, out, options=task.options,
                         representative=task.x_train[:256])
        return out
    arch, shape, options = MODELS[model]
    x_train = digits_split()[0]
    with contextlib.redirect_stdout(io.StringIO()):  # the converter is chatty; stdout carries our JSON
        export_model(arch, shape, 10, out, options=options, representative=x_train.reshape(-1, *shape)[:256])
    return out


def export_in_child(models: Sequence[str], cache: Path) -> None:
    """Export the models in a separate process, so TensorFlow never loads into the caller."""
    missing = [m for m in models if not cached(cache / m)]
    if missing:
        run_child(BENCH_DIR / "benchlib.py", ["export", str(cache), *missing])


def machine() -> dict[str, Any]:
    """CPU, cores, RAM, Python and library versions, for the results file."""
    import importlib.metadata as md
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "flwr": version("flwr"), "tensorflow": version("tensorflow-cpu"),
            "ai_edge_litert": version("ai-edge-litert"), "numpy": version("numpy"),
            "zstandard": version("zstandard"), "mosquitto": _mosquitto_version()}


def _mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5, check=False).stdout
        return out.splitlines()[0].split("version")[-1].strip() if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "export":
    for name in sys.argv[3:]:
        export(name, Path(sys.argv[2]))
    emit({"exported": sys.argv[3:]})
