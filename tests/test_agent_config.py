"""Agent configuration and local data: clear errors for bad values, every data source loads."""

from __future__ import annotations

import numpy as np
import pytest

from fedlite.agent.config import load_config
from fedlite.agent.data import DataError, DataSpec, load_local_data
from fedlite.settings import ConfigError

GOOD = """
[device]
client_id = "dev-1"
federation = "digits"
state_dir = "{tmp}/state"

[data]
source = "npz"
path = "{tmp}/d.npz"

[broker]
host = "localhost"
port = 8883

[trust]
allow_unsigned = true
"""


def test_a_valid_config_loads_with_defaults(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.format(tmp=tmp_path))
    config = load_config(path)
    assert config.device.client_id == "dev-1" and config.broker.tls is True
    assert config.gates.metered_interfaces[:2] == ["wwan*", "ppp*"]


@pytest.mark.parametrize(
    "change, message",
    [
        (("port = 8883", "port = 70000"), "port must be 1-65535"),
        (('client_id = "dev-1"', 'client_id = "dev 1/#"'), "invalid client_id"),
        (("port = 8883", 'port = "8883"'), "port must be int"),
        (('source = "npz"', 'source = "parquet"'), "data.source must be one of"),
        (("[broker]", "[brokr]"), "unknown key"),
        (('host = "localhost"', 'host = "localhost"\npassword = "a"\npassword_file = "b"'), "not both"),
        (("[data]", "[data\n"), "not valid TOML"),
    ],
)
def test_bad_values_give_a_clear_error(tmp_path, change, message):
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.format(tmp=tmp_path).replace(*change))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_npz_csv_shards_and_hook_sources(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    csv = "a,label,b\n" + "\n".join(f"{r[0]},{lab},{r[1]}" for r, lab in zip(x, y, strict=True)) + "\n"
    (tmp_path / "d.csv").write_text(csv)
    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "001.npz", x=x[:10], y=y[:10])
    np.savez(shards / "002.npz", x=x[10:], y=y[10:])
    for spec in (DataSpec("npz", str(tmp_path / "d.npz")), DataSpec("csv", str(tmp_path / "d.csv")),
                 DataSpec("shards", str(shards)), DataSpec("hook", hook="test_agent_config:_hook_data")):
        data = load_local_data(spec)
        assert len(data.x_train) == 16 and len(data.x_holdout) == 4, spec.source
        pooled = np.concatenate([data.x_train, data.x_holdout])
        assert sorted(map(tuple, pooled.tolist())) == sorted(map(tuple, x.tolist())), spec.source


def _hook_data() -> tuple[np.ndarray, np.ndarray]:
    return np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20) % 3


@pytest.mark.parametrize(
    "spec, message",
    [
        (DataSpec("npz", "/nonexistent.npz"), "does not exist"),
        (DataSpec("hook", hook="no_colon"), "must look like"),
        (DataSpec("hook", hook="json:nothing_here"), "cannot load data hook"),
        (DataSpec("shards", "/nonexistent"), "does not exist"),
    ],
)
def test_bad_data_sources_raise_data_error(spec, message):
    with pytest.raises(DataError, match=message):
        load_local_data(spec)


def test_csv_with_text_values_or_missing_label_column(tmp_path):
    (tmp_path / "a.csv").write_text("x,label\n1,0\noops,1\n")
    with pytest.raises(DataError, match="not a number"):
        load_local_data(DataSpec("csv", str(tmp_path / "a.csv")))
    (tmp_path / "b.csv").write_text("x,y\n1,0\n")
    with pytest.raises(DataError, match="'label' column"):
        load_local_data(DataSpec("csv", str(tmp_path / "b.csv")))
