"""Row 3: device-side memory, the fedlite agent (real process, real Mosquitto) vs a Flower client.

fedlite: `fedlite agent --config` (the product's .venv interpreter, as a device runs it) started through
`LocalFederation` against a real Mosquitto over TLS, with a digits shard; a coordinator (a plain MQTT client,
as in tests/test_agent_e2e.py) publishes the 8x8 CNN's train.tflite, the global weights and one round
announcement per round, 3 rounds. The agent trains each round in a child process that exits after it. Idle =
median VmRSS of the agent (no child is running then) once it is connected and eligible (before its first round)
and 1 s after each round, with PSS; training = the largest sum of the agent's and its round process's VmRSS,
sampled every 10 ms over each round; the CPU seconds of both and the load average. Spawn = the start-up job
(`agent.supervisor.Jobs.run` of a probe: a new interpreter importing numpy, the data and the codecs), repeated:
what a round's process adds to the round before its work starts.

Flower: a process running a `ClientApp(client_fn=...)` whose `NumPyClient.fit()` does the same local training
on the same shard, driven by a real Flower train `Message` (FitIns -> FitRes through Flower's legacy handler,
the code path a SuperNode's ClientApp process runs). Its trainer is the same TFLite Trainer ("tflite", like
for like) or TensorFlow (the same model's `tf.function`, "tf", what a TensorFlow user of Flower runs). Idle =
after imports and building the ClientApp; training = VmHWM over one `app(message, context)` call. Optionally
(--supernode) the idle RSS of a real `flower-supernode` (plus its `flower-superexec` child) connected to a
real local `flower-superlink`: what stays resident on a Flower device between runs.

    python benchmarks/agent_footprint.py [--epochs 5] [--supernode]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import (
    BENCH_DIR,
    BENCH_PYTHON,
    MAIN_PYTHON,
    MIB,
    digits_split,
    emit,
    export_in_child,
    flower_version,
    median,
    proc_status,
    reset_peak_rss,
    run_child,
)

FED, DEVICE, SHARD = "bench", "dev-a", 600
IDLE_MAX_MB, TRAIN_MAX_MB, IDLE_RATIO = 40 * 1e6 / 2**20, 76, 0.5  # 40 MB, the 76 MiB of the one-process agent


def sample_rss(pid: int | str, seconds: float = 2.0, samples: int = 5) -> int:
    values = []
    for _ in range(samples):
        values.append(proc_status(pid)["VmRSS"])
        time.sleep(seconds / samples)
    return int(median(values))


def shard() -> tuple[np.ndarray, np.ndarray]:
    x, y, _, _ = digits_split()
    return x[:SHARD], y[:SHARD]


# --- fedlite agent --------------------------------------------------------------------------------


class Coordinator:
    """Plays the aggregator's part with a plain MQTT v5 client (as tests/test_agent_e2e.py does)."""

    def __init__(self, host: str, port: int, password: str, manifest: dict[str, Any], train: bytes,
                 sign: Any = None) -> None:
        import paho.mqtt.client as mqtt

        from fedlite.protocol import topics
        from fedlite.protocol.codec import Header, encode_model

        self.manifest, self.messages = manifest, queue.Queue()
        self.sign = sign or (lambda _topic, payload: payload)  # broadcasts are signed where agents pin a key
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aggregator", protocol=mqtt.MQTTv5)
        self.client.username_pw_set("aggregator", password)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        for topic in (topics.all_updates(FED), topics.all_statuses(FED)):
            self.client.subscribe(topic, qos=1)
        header = Header(kind="model", federation=FED, round=0, model_hash=manifest["model_hash"],
                        extra={"manifest": manifest})
        self.publish(topics.model_topic(FED, manifest["model_hash"]), encode_model(train, header))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, self.sign(topic, payload), qos=1, retain=True)

    def announce(self, number: int, weights: dict[str, np.ndarray], epochs: int) -> None:
        from fedlite.protocol import topics
        from fedlite.protocol.codec import Header, encode_weights
        from fedlite.protocol.messages import RoundAnnouncement, TrainingPlan, to_json
        from fedlite.protocol.selection import choose

        model_hash = self.manifest["model_hash"]
        header = Header(kind="weights", federation=FED, round=number, model_hash=model_hash, run="bench")
        self.publish(topics.weights_topic(FED, number), encode_weights(weights, header))
        announcement = RoundAnnouncement(
            federation=FED, round=number, model_hash=model_hash, model_topic=topics.model_topic(FED, model_hash),
            weights_topic=topics.weights_topic(FED, number), selection=choose([DEVICE], 1, "00" * 16)[1],
            deadline=time.time() + 300,
            plan=TrainingPlan(epochs=epochs, batch_size=32, learning_rate=0.05), session=f"s{number}",
            issued_at=time.time(), run="bench", run_started_at=1.0, epoch=1)
        self.publish(topics.round_topic(FED), to_json(announcement))

    def wait(self, kind: str, timeout: float, check: Any = None) -> bytes:
        end = time.time() + timeout
        while time.time() < end:
            try:
                topic, payload = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if topic.split("/")[2] == kind and payload and (check is None or check(payload)):
                return payload
        raise TimeoutError(f"no {kind} message within {timeout:.0f} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def fedlite_agent(model_dir: Path, epochs: int, run_dir: Path, rounds: int = 3) -> dict[str, Any]:
    """Idle VmRSS/PSS before the first round and after each, the peak of each round, CPU time and load."""
    from fedlite.demo.cluster import LocalFederation, write_shard
    from fedlite.protocol.codec import decode
    from fedlite.protocol.layout import num_params, unflatten
    from fedlite.protocol.manifest import load_manifest

    manifest = load_manifest(model_dir)
    weights = unflatten(np.random.default_rng(0).normal(0, 0.1, num_params(manifest)).astype(np.float32), manifest)
    with LocalFederation(run_dir, FED, [DEVICE]) as fed:
        fed.start_broker()
        x, y = shard()
        data = write_shard(run_dir / "shard.npz", x.reshape(-1, *manifest["input"]["shape"]), y)  # the model's shape
        config = fed.agent_config(DEVICE, data, agent={"status_interval_seconds": 0.5, "max_epochs": 1000})
        coordinator = Coordinator(fed.broker.host, fed.broker.port, fed.passwords["aggregator"], manifest,
                                  (model_dir / "train.tflite").read_bytes(), getattr(fed, "sign", None))
        agent = fed.start_command(DEVICE, [str(MAIN_PYTHON), "-m", "fedlite.cli", "agent", "--config", str(config)])
        try:
            coordinator.wait("status", 60, lambda p: json.loads(p).get("eligible"))
            time.sleep(2.0)
            pid = agent.popen.pid
            idle, idle_pss, cpu_idle = sample_rss(pid), pss(pid), cpu_seconds(pid)
            peaks, peaks_pss, after, after_pss, seconds, round_cpu, examples = [], [], [], [], [], [], 0
            for number in range(1, rounds + 1):
                reset_peak_rss(pid)
                started, cpu_before = time.perf_counter(), cpu_seconds(pid)
                with TreePeak(pid) as peak:
                    coordinator.announce(number, weights, epochs)
                    update = decode(coordinator.wait("updates", 120,
                                                     lambda p, n=number: decode(p).header.round == n))
                    seconds.append(time.perf_counter() - started)
                    wait_children_gone(pid)
                round_cpu.append(cpu_seconds(pid) - cpu_before)  # the agent's and its round process's
                peaks.append(max(peak.bytes, proc_status(pid)["VmHWM"]))
                peaks_pss.append(peak.pss)
                time.sleep(1.0)
                after.append(sample_rss(pid))
                after_pss.append(pss(pid))
                examples = update.header.num_examples
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- agent log ---\n{agent.log_tail(30)}") from exc
        finally:
            coordinator.close()
        spawn = spawn_seconds(config)
        return {"spawn_wall_seconds": spawn["wall_seconds"], "spawn_cpu_seconds": spawn["cpu_seconds"],
                "idle_bytes": idle, "idle_pss_bytes": idle_pss, "train_peak_bytes": max(peaks),
                "train_peak_pss_bytes": max(peaks_pss),
                "round_peak_bytes": peaks, "after_round_bytes": max(after), "after_rounds_bytes": after,
                "after_round_pss_bytes": max(after_pss), "round_seconds": seconds, "round_cpu_seconds": round_cpu,
                "update_examples": examples,
                "cpu_seconds_startup": cpu_idle, "cpu_seconds_total": cpu_seconds(pid), "load": os.getloadavg(),
                "python": str(MAIN_PYTHON),
                "process": "fedlite agent --config (paho-mqtt, PyNaCl; each round's process: numpy, ai-edge-litert)"}


class TreePeak:
    """The largest VmRSS (and PSS) of a process plus its children's, sampled every 10 ms on a thread while in the
    block. The RSS sum counts the pages both share (libc, libpython, OpenSSL) twice; the PSS sum counts them once."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.bytes, self.pss, self._stop = pid, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            rss = proportional = 0
            for pid in (self.pid, *children_of(self.pid)):
                try:
                    rss += proc_status(pid)["VmRSS"]
                    proportional += pss(pid)
                except (OSError, KeyError):
                    continue
            self.bytes, self.pss = max(self.bytes, rss), max(self.pss, proportional)


def wait_children_gone(pid: int, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while children_of(pid) and time.time() < end:
        time.sleep(0.05)


def spawn_seconds(config: Path, repeats: int = 10) -> dict[str, list[float]]:
    """Wall and CPU seconds of a job's process that does nothing but start (the probe job), `repeats` times."""
    script = (
        "import json, resource, sys, time\n"
        "from fedlite.agent.config import load_config\n"
        "from fedlite.agent.host import Job\n"
        "class Idle:  # the probe asks its host nothing; the supervisor asks whether to stop it\n"
        "    def closed(self, attempt=True): return ''\n"
        "from fedlite.agent.supervisor import Jobs\n"
        "config, walls, cpus = load_config(sys.argv[1]), [], []\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()\n"
        "    assert Jobs().run(Job('probe', config), Idle(), lambda: None).kind == 'probed'\n"
        "    after = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "    walls.append(time.perf_counter() - t)\n"
        "    cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)\n"
        "print(json.dumps({'wall_seconds': walls, 'cpu_seconds': cpus}))\n")
    done = subprocess.run([str(MAIN_PYTHON), "-c", script, str(config), str(repeats)], capture_output=True, text=True)
    if done.returncode and "No module named 'fedlite.agent.host'" in done.stderr:
        return {"wall_seconds": [], "cpu_seconds": []}  # an agent of one process: nothing is spawned
    if done.returncode:
        raise RuntimeError(f"the spawn timing failed: {done.stderr[-2000:]}")
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


def pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages divided among their users), from smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# --- Flower client --------------------------------------------------------------------------------


def imported_top_level() -> list[str]:
    wanted = ("flwr", "tensorflow", "ai_edge_litert", "numpy", "grpc", "google.protobuf", "fastapi", "httpx",
              "pydantic", "sqlalchemy", "cryptography", "sklearn", "scipy", "fedlite")
    return [name for name in wanted if name in sys.modules]


def flower_client(model_dir: Path, trainer_kind: str, epochs: int) -> dict[str, Any]:
    """Runs inside the Flower child process: idle after imports, then one FitIns through the ClientApp."""
    from flwr.app import Context, Message, RecordDict
    from flwr.client import NumPyClient
    from flwr.clientapp import ClientApp
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
    from uplink import flower_identity

    if trainer_kind == "tflite":
        from fedlite.runtime.trainer import Trainer, local_update
    else:
        import tensorflow as tf

    data = model_dir / "shard.npz"  # written by the parent: loading digits here would import scikit-learn

    class DigitsClient(NumPyClient):
        """The same local training as the fedlite agent: 80 % of the shard, SGD, batch 32, lr 0.05."""

        def __init__(self) -> None:
            local = np.load(data)
            self.x, self.y = local["x"][: int(0.8 * SHARD)], local["y"][: int(0.8 * SHARD)]

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            if trainer_kind == "tflite":
                trainer = Trainer.from_dir(model_dir)
                flat = np.concatenate([p.reshape(-1) for p in parameters])
                delta, _ = local_update(trainer, flat, self.x, self.y, int(config["epochs"]), 32, 0.05)
                trained = [parameters[i] + d for i, d in enumerate(delta.values())]
            else:
                trained = tf_fit(model_dir, parameters, self.x, self.y, int(config["epochs"]))
            return trained, len(self.x), {}

    app = ClientApp(client_fn=lambda context: DigitsClient().to_client())
    gc.collect()
    time.sleep(0.5)
    idle = sample_rss("self")
    modules = len(sys.modules)
    flower_identity()
    weights = [np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32) for shape in weight_shapes(model_dir)]
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {"epochs": epochs}), keep_input=True)
    message = Message(content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reset_peak_rss()
    started, cpu_before = time.perf_counter(), time.process_time()
    reply = app(message, context)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_before
    fit_res = recorddict_to_fitres(reply.content, keep_input=True)
    assert len(parameters_to_ndarrays(fit_res.parameters)) == len(weights) and fit_res.num_examples > 0
    _ = tf if trainer_kind == "tf" else None
    return {"idle_bytes": idle, "train_peak_bytes": proc_status()["VmHWM"], "round_seconds": seconds,
            "round_cpu_seconds": cpu, "examples": int(fit_res.num_examples), "modules_at_idle": modules,
            "imported": imported_top_level(), "trainer": trainer_kind}


def weight_shapes(model_dir: Path) -> list[tuple[int, ...]]:
    from fedlite.protocol.layout import weight_specs
    from fedlite.protocol.manifest import load_manifest

    return [shape for _, shape in weight_specs(load_manifest(model_dir))]


def tf_fit(model_dir: Path, parameters: list[np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int) -> list:
    """The same model as a tf.function (the module fedlite converts), trained with the same SGD."""
    import tensorflow as tf

    from fedlite.model_export.architectures import build
    from fedlite.model_export.trainable import make_module
    from fedlite.protocol.manifest import load_manifest
    from fedlite.runtime.trainer import one_hot

    manifest = load_manifest(model_dir)
    model_def = build(manifest["arch"], manifest["input"]["shape"], manifest["classes"], **manifest["options"])
    module = make_module(model_def, {name: p for (name, _), p in zip(model_def.weights, parameters, strict=True)})
    xs, ys = x.reshape(-1, *model_def.input_shape).astype(np.float32), one_hot(y, model_def.classes)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(xs))
        for i in range(0, len(xs), 32):
            batch = order[i:i + 32]
            module.train(tf.constant(xs[batch]), tf.constant(ys[batch]), tf.constant(0.05), tf.constant(0.0))
    return [v.numpy() for v in module.vars]


# --- a real SuperNode -----------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def supernode_idle(run_dir: Path, settle: float = 12.0) -> dict[str, Any]:
    """Idle RSS of a real flower-supernode (+ its superexec child) connected to a local flower-superlink."""
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "FLWR_HOME": str(run_dir / "flwr")}
    link_port, node_port = free_port(), free_port()
    procs = []
    try:
        for name, cmd in (("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                         str(link_port), "--control-api-address", f"127.0.0.1:{free_port()}"]),
                          ("supernode", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                         "--host", "127.0.0.1", "--port", str(node_port)])):
            log = (run_dir / f"{name}.log").open("wb")
            procs.append(subprocess.Popen([str(bin_dir / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                                          env=env, cwd=run_dir, start_new_session=True))
            time.sleep(4.0 if name == "superlink" else settle)
        node = procs[1].pid
        node_rss = sample_rss(node)
        exec_rss = sum(sample_rss(child) for child in children_of(node))
        log_text = (run_dir / "supernode.log").read_text(errors="replace")
        return {"supernode_bytes": node_rss, "superexec_bytes": exec_rss, "idle_bytes": node_rss + exec_rss,
                "connected": "Connection attempt failed" not in log_text.splitlines()[-1] if log_text else False}
    finally:
        for proc in reversed(procs):
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


# --- driver ---------------------------------------------------------------------------------------


def measure(cache: Path, epochs: int, flower: bool, supernode: bool, trainers: list[str],
            model: str = "cnn") -> dict[str, Any]:
    export_in_child([model], cache)
    run_dir = Path(tempfile.mkdtemp(prefix="fedlite-footprint-"))
    try:
        out: dict[str, Any] = {"model": model, "epochs": epochs, "shard": SHARD,
                               "fedlite": fedlite_agent(cache / model, epochs, run_dir / "fedlite")}
        if flower:
            model_copy = run_dir / "flower-model"
            shutil.copytree(cache / model, model_copy)
            np.savez(model_copy / "shard.npz", **dict(zip(("x", "y"), shard(), strict=True)))
            for kind in trainers:
                out[f"flower_{kind}"] = run_child(BENCH_DIR / "agent_footprint.py", [
                    "--flower-child", kind, "--model-dir", model_copy, "--epochs", epochs], python=sys.executable)
            if supernode:
                (run_dir / "supernode").mkdir()
                out["flower_supernode"] = supernode_idle(run_dir / "supernode")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return summarize(out)


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    f = out["fedlite"]
    out["fedlite_idle_mb"], out["fedlite_train_mb"] = f["idle_bytes"] / MIB, f["train_peak_bytes"] / MIB
    out["fedlite_train_pss_mb"] = f["train_peak_pss_bytes"] / MIB
    out["fedlite_after_round_mb"] = f["after_round_bytes"] / MIB
    out["fedlite_idle_pss_mb"], out["fedlite_after_round_pss_mb"] = f["idle_pss_bytes"] / MIB, \
        f["after_round_pss_bytes"] / MIB
    epochs = out["epochs"]
    f_seconds = median(f["round_seconds"])
    out["fedlite_train_samples_per_s"] = f["update_examples"] * epochs / f_seconds  # announcement to update
    out["fedlite_round_cpu_seconds"] = median(f["round_cpu_seconds"])
    for kind in ("tflite", "tf"):
        other = out.get(f"flower_{kind}")
        if other:
            rate = other["examples"] * epochs / other["round_seconds"]
            out[f"flower_{kind}_train_samples_per_s"] = rate
            out[f"train_throughput_ratio_vs_flower_{kind}"] = out["fedlite_train_samples_per_s"] / rate
            out[f"flower_{kind}_idle_mb"] = other["idle_bytes"] / MIB
            out[f"idle_ratio_vs_flower_{kind}"] = f["idle_bytes"] / other["idle_bytes"]
            out[f"after_round_ratio_vs_flower_{kind}"] = f["after_round_bytes"] / other["idle_bytes"]
    flower = out.get("flower_tflite")
    if flower:
        out["flower_idle_mb"], out["flower_train_mb"] = flower["idle_bytes"] / MIB, flower["train_peak_bytes"] / MIB
        out["idle_ratio"] = f["idle_bytes"] / flower["idle_bytes"]
        out["train_ratio"] = f["train_peak_bytes"] / flower["train_peak_bytes"]
    if out.get("flower_supernode"):
        out["idle_ratio_vs_supernode"] = f["idle_bytes"] / out["flower_supernode"]["idle_bytes"]
    for key in ("spawn_wall_seconds", "spawn_cpu_seconds"):
        values = sorted(f[key])
        if values:  # none for an agent of one process (an older checkout on PYTHONPATH)
            out[key.replace("seconds", "min_median_max")] = [values[0], median(values), values[-1]]
    out["met_idle"] = out["fedlite_idle_mb"] < IDLE_MAX_MB
    out["met_train"] = out["fedlite_train_mb"] < TRAIN_MAX_MB
    out["met_idle_ratio"] = out["idle_ratio"] <= IDLE_RATIO if "idle_ratio" in out else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="local epochs of the one round (default 5)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--supernode", action="store_true", help="also measure a real idle flower-supernode")
    parser.add_argument("--trainers", default="tflite,tf", help="Flower client trainers: tflite, tf")
    parser.add_argument("--flower-child", choices=("tflite", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flower_child:
        emit(flower_client(args.model_dir, args.flower_child, args.epochs))
        return
    flower = flower_version() is not None
    if not flower and BENCH_PYTHON.exists() and Path(sys.prefix).resolve() != BENCH_PYTHON.parent.parent.resolve():
        os.execv(BENCH_PYTHON, [str(BENCH_PYTHON), __file__, *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-") as tmp:
        emit(measure(args.cache or Path(tmp), args.epochs, flower, args.supernode, args.trainers.split(",")))


if __name__ == "__main__":
    main()
