"""`[agent] seed`: reproducible local shuffles by default (a seed of the client id), unseeded only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlite.agent.config import load_config
from fedlite.agent.round import round_seed
from fedlite.settings import ConfigError


def test_the_default_seed_is_each_devices_own_the_same_in_every_run_and_each_rounds_own() -> None:
    assert round_seed(0, "pi-1", 3) == round_seed(0, "pi-1", 3) != round_seed(0, "pi-2", 3)
    assert round_seed(0, "pi-1", 3) != round_seed(0, "pi-1", 4)
    assert round_seed(7, "pi-1", 3) == [7, 3] and round_seed(-1, "pi-1", 3) is None


def test_seed_minus_one_means_unseeded_and_below_is_refused(tmp_path: Path) -> None:
    base = ('[device]\nclient_id = "pi-1"\nfederation = "f"\n[data]\npath = "x.npz"\n'
            '[trust]\nallow_unsigned = true\n[agent]\n')
    path = tmp_path / "agent.toml"
    path.write_text(base + "seed = -1\n")
    assert load_config(path).agent.seed == -1
    path.write_text(base + "seed = -2\n")
    with pytest.raises(ConfigError, match="seed"):
        load_config(path)
