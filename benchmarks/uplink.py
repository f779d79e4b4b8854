"""Row 1: bytes per client update on the uplink, fedlite's int8 + zstd frame vs Flower's float32 reply message.

The update is real: one client's local training (TFLite trainer, digits, one Dirichlet shard) from the exported
initial weights. fedlite sends `encode_update(delta)` (int8 per channel, zstd on). Flower 1.4x sends its reply
`Message` (an `ArrayRecord` of the trained float32 weights plus a `MetricRecord` with num-examples) as the
objects its SuperNode pushes (`get_all_nested_objects(message)`, each `deflate()`d); the legacy
`ndarrays_to_parameters` size is reported too. Transport framing (MQTT, HTTP/protobuf) is left out on both sides.

    python benchmarks/uplink.py [--models mlp,mlp100k]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import digits_split, dirichlet, emit, export_in_child, flower_version

TARGET = 0.27


def client_update(model_dir: Path, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(delta, trained weights, num_examples) of one client's local round on a Dirichlet digits shard."""
    from fedlite.protocol.layout import unflatten
    from fedlite.runtime.trainer import Trainer, local_update

    x, y, _, _ = digits_split()
    part = dirichlet(y, 10, 0.5, np.random.default_rng(seed))[0]
    trainer = Trainer.from_dir(model_dir)
    start = trainer.get_weights()
    delta, _ = local_update(trainer, start, x[part], y[part], epochs=2, batch_size=32, lr=0.1,
                            rng=np.random.default_rng(seed))
    weights = unflatten(trainer.get_weights(), trainer.manifest)
    return delta, weights, len(part)


def fedlite_bytes(delta: dict[str, np.ndarray], num_examples: int, compress: bool = True) -> int:
    from fedlite.protocol.codec import Header, encode_update

    header = Header(kind="update", federation="bench", round=1, model_hash="ab" * 32, client_id="dev-00000",
                    num_examples=num_examples, metrics={"train_loss": 0.5, "steps": 10.0})
    return len(encode_update(delta, header, compress=compress))


def flower_identity() -> None:
    """Flower messages need a run/node identity, which a SuperNode sets; any fixed values do here."""
    import logging

    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation at INFO

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def flower_reply(weights: dict[str, np.ndarray], num_examples: int, node_id: int = 1) -> Any:
    """A Flower train reply as a ClientApp returns it: ArrayRecord + MetricRecord, replying to a train message."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    flower_identity()
    arrays = ArrayRecord({name: Array(np.asarray(value, np.float32)) for name, value in weights.items()})
    instruction = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})}), dst_node_id=node_id,
                          message_type="train")
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(content, reply_to=instruction)


def flower_wire(message: Any) -> dict[str, bytes]:
    """The objects (object id -> deflated bytes) a SuperNode pushes for `message`."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}


def flower_bytes(weights: dict[str, np.ndarray], num_examples: int) -> dict[str, int]:
    from flwr.common import ndarrays_to_parameters

    wire = flower_wire(flower_reply(weights, num_examples))
    legacy = ndarrays_to_parameters([np.asarray(v, np.float32) for v in weights.values()])
    return {"message": sum(map(len, wire.values())), "parameters": sum(len(t) for t in legacy.tensors)}


def measure(model: str, cache: Path) -> dict[str, Any]:
    export_in_child([model], cache)
    delta, weights, n = client_update(cache / model)
    params = sum(v.size for v in delta.values())
    row: dict[str, Any] = {"model": model, "params": int(params), "float32_bytes": 4 * int(params),
                           "fedlite_bytes": fedlite_bytes(delta, n), "fedlite_bytes_no_zstd": fedlite_bytes(delta, n,
                                                                                                        False)}
    if flower_version():
        flower = flower_bytes(weights, n)
        row |= {"flower_bytes": flower["message"], "flower_parameters_bytes": flower["parameters"],
                "ratio": row["fedlite_bytes"] / flower["message"]}
    else:
        row |= {"flower_bytes": None, "ratio": None}
    row["ratio_vs_float32"] = row["fedlite_bytes"] / row["float32_bytes"]
    row["met"] = (row["ratio"] if row["ratio"] is not None else row["ratio_vs_float32"]) <= TARGET
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,mlp100k")
    parser.add_argument("--cache", type=Path, default=None, help="exported models (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-") as tmp:
        emit([measure(m, args.cache or Path(tmp)) for m in args.models.split(",")])


if __name__ == "__main__":
    main()
