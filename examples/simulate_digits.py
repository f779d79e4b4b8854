"""Federated digits from Python: `fedlite.simulation.run` on scikit-learn's digits, split over a few devices.

Written in `# %%` cells: open it in Jupyter (jupytext), VS Code or PyCharm as a notebook, or run it as a script:

    .venv/bin/python examples/simulate_digits.py [--rounds 20] [--clients 8] [--codec int4] [--processes]
"""

# %% [markdown]
# ## The data: one (x, y) pair per device
# Each device holds mostly two digits (a label skew, as real devices' data has), plus a few random examples;
# the server keeps a test set of its own.

# %%
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedlite import simulation


def digits_devices(clients: int, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray,
                                                                                                      np.ndarray]]:
    """(one (x, y) pair per device, the server's test set): the digits sorted by label and cut into `clients`
    shards, each with 20 random examples of any label added."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, stratify=digits.target,
                                                        random_state=seed)
    rng = np.random.default_rng(seed)
    shards = np.array_split(np.argsort(y_train, kind="stable"), clients)
    parts = [np.concatenate([shard, rng.choice(len(y_train), 20, replace=False)]) for shard in shards]
    return [(x_train[p], y_train[p]) for p in parts], (x_test, y_test)


# %% [markdown]
# ## The run
# `model` is an architecture name (exported with TensorFlow on the way), or an exported model directory;
# `strategy` a server optimizer or aggregation rule (or `(name, {option: value})`); `codec` the update encoding.
# `processes=True` runs the same federation as a real Mosquitto, an aggregator and one agent process per device.

# %%
def main(rounds: int = 20, clients: int = 8, codec: str = "int4", strategy: str = "fedavg",
         model: str | Path = "mlp", processes: bool = False, plot_to: str | Path | None = None) -> simulation.History:
    devices, test = digits_devices(clients)
    history = simulation.run(model=model, partitions=devices, test=test, rounds=rounds, strategy=strategy,
                             codec=codec, local_epochs=2, processes=processes,
                             progress=lambda r: print(f"round {r.round:3d}  accuracy {r.accuracy or 0:.3f}"))
    show(history)
    if plot_to is not None:
        plot(history, plot_to)
    return history


# %% [markdown]
# ## The history
# A typed `History`: `rounds` are the aggregator's own `RoundRecord`s; `as_rows()` gives plain dicts
# (`pandas.DataFrame(history.as_rows())` if you have pandas).

# %%
def show(history: simulation.History) -> None:
    print(f"\n{history.mode}, {history.clients} devices, {history.strategy}, {history.codec}: accuracy "
          f"{history.initial_accuracy or 0:.3f} -> {history.final_accuracy or 0:.3f} in {history.seconds:.1f} s; "
          f"{history.bytes_up / 1e3:.0f} kB up, {history.bytes_down / 1e3:.0f} kB down")
    print(f"{'round':>5} {'accepted':>8} {'accuracy':>8} {'bytes up':>9} {'bytes down':>10}")
    for row in history.as_rows():
        print(f"{row['round']:5d} {row['accepted']:8d} {row['accuracy'] or 0:8.3f} {row['bytes_up']:9d} "
              f"{row['bytes_down']:10d}")


def plot(history: simulation.History, path: str | Path) -> None:
    """Accuracy against the round and against the cumulative traffic, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = history.complete
    traffic = np.cumsum([r.bytes_up + r.bytes_down for r in rounds]) / 1e3
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot([r.round for r in rounds], history.accuracies, marker="o")
    left.set(xlabel="round", ylabel="test accuracy")
    right.plot(traffic, history.accuracies, marker="o")
    right.set(xlabel="kB up + down, cumulative", ylabel="test accuracy")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# %%
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--codec", default="int4")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--model", default="mlp", help="an architecture name or an exported model directory")
    parser.add_argument("--processes", action="store_true", help="a real broker and agent processes")
    parser.add_argument("--plot", default="simulate_digits.png", help="where to save the plot")
    args, _ = parser.parse_known_args()  # a notebook kernel passes arguments of its own
    main(args.rounds, args.clients, args.codec, args.strategy, args.model, args.processes, args.plot)
