"""`fedlite.simulation.run`: in process and as real processes, its typed history, its errors, and the example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import initial_model

from fedlite import simulation
from fedlite.aggregator.record import RoundRecord
from fedlite.protocol.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP's round-0 export, shared with the other federation tests."""
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


def test_in_process_rounds_on_digits_raise_accuracy_and_come_back_typed(model):
    history = simulation.run(model=model, partitions=simulation.Partition("digits", clients=5), rounds=4,
                             codec="int4", local_epochs=2)
    assert isinstance(history, simulation.History) and history.mode == "in-process"
    assert [type(r) for r in history.rounds] == [RoundRecord] * 4
    assert [r.status for r in history.rounds] == ["complete"] * 4
    assert all(r.accepted == r.selected == 5 and not r.rejected for r in history.rounds)
    accuracies = history.accuracies
    assert accuracies == sorted(accuracies), accuracies
    assert history.final_accuracy > history.initial_accuracy + 0.4, (history.initial_accuracy, accuracies)
    # every update was encoded by the int4 codec and checked by the aggregator: about half a byte per weight
    params = int(load_manifest(model)["num_params"])
    per_update = history.bytes_up / sum(r.accepted for r in history.rounds)
    assert 0.4 * params < per_update < 0.8 * params, per_update
    # round 1 downloads the model and the full weights, later rounds the int4 delta chain
    assert history.rounds[0].bytes_down > 5 * history.rounds[1].bytes_down > 0
    rows = history.as_rows()
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert sum(row["bytes_up"] for row in rows) == history.bytes_up
    assert rows[-1]["accuracy"] == history.final_accuracy
    assert set(history.weights) == {w["name"] for w in load_manifest(model)["weights"]}


def test_a_builder_of_ones_own_is_found_from_the_current_directory(monkeypatch):
    monkeypatch.chdir(ROOT / "tests")
    history = simulation.run(model={"builder": "helpers_models.py:softmax_regression", "arch": "softmax"},
                             partitions=simulation.Partition("wine", clients=3), rounds=3)
    assert sorted(history.weights) == ["linear/bias", "linear/kernel"]
    assert history.weights["linear/kernel"].shape == (13, 3)  # wine: 13 features, 3 cultivars
    assert history.final_accuracy > history.initial_accuracy + 0.2


@pytest.mark.parametrize(("arguments", "names"), [
    ({"codec": "int3"}, ["int8", "int4", "ternary-ef"]),
    ({"strategy": "fedsgd"}, ["fedavg", "fedadam", "trimmed_mean"]),
    ({"model": "resnet"}, ["mlp", "cnn", "conv1d"]),
    ({"strategy": ("fedadam", {"beta9": 0.9})}, ["beta1", "beta2", "tau"]),
])
def test_unknown_names_are_value_errors_naming_the_valid_ones(arguments, names):
    with pytest.raises(ValueError) as raised:
        simulation.run(**{"partitions": simulation.Partition("wine", clients=2), "rounds": 1} | arguments)
    message = str(raised.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_a_round_that_never_completes_stops_the_run_saying_why(model):
    """FedAdam at the default server learning rate of 1 overshoots: the commit refuses round 1's step each time."""
    with pytest.raises(RuntimeError, match=r"^round 1 was not completed in 3 attempts \(last attempt: the step's "
                       r"norm [\d.]+ exceeds 1 x the weights' norm [\d.]+\)$"):
        simulation.run(model=model, partitions=simulation.Partition("digits", clients=5), rounds=3,
                       strategy="fedadam")


def test_processes_run_the_same_federation_as_the_in_process_mode(model, tmp_path):
    """A real Mosquitto, aggregator and agent processes: the same rounds, weights and traffic as in process."""
    arguments = {"model": model, "partitions": simulation.Partition("digits", clients=3), "rounds": 2,
                 "strategy": ("fedavgm", {"momentum": 0.5})}
    real = simulation.run(**arguments, processes=True, run_dir=tmp_path / "run")
    assert real.mode == "processes" and [r.status for r in real.rounds] == ["complete"] * 2
    assert (tmp_path / "run" / "logs" / "device-02.log").is_file()  # an agent process per device
    fast = simulation.run(**arguments)
    assert real.initial_accuracy == pytest.approx(fast.initial_accuracy)
    assert real.accuracies == pytest.approx(fast.accuracies, abs=0.005)
    for name, value in fast.weights.items():
        np.testing.assert_allclose(real.weights[name], value, atol=1e-5)
    assert real.bytes_up == pytest.approx(fast.bytes_up, rel=0.01)
    assert real.bytes_down == pytest.approx(fast.bytes_down, rel=0.01)


def test_the_example_runs_and_plots_its_history(model, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("simulate_digits", ROOT / "examples" / "simulate_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(rounds=3, clients=4, model=model, plot_to=tmp_path / "history.png")
    assert history.final_accuracy > history.initial_accuracy + 0.2
    assert (tmp_path / "history.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert f"accuracy {history.final_accuracy:.3f}" in out and "bytes up" in out
