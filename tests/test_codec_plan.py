"""The run's update encoding: chosen in [training], validated against the registry, and devices that cannot
produce it are not selected."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedlite.aggregator.config import AggregatorConfig, FederationSection, load_config
from fedlite.aggregator.service import Aggregator
from fedlite.protocol import codecs
from fedlite.protocol.messages import DeviceStatus, RoundAnnouncement, TrainingPlan, from_json, to_json
from fedlite.protocol.selection import choose
from fedlite.settings import ConfigError


def _config(tmp_path: Path, training: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(f'[federation]\nname = "f"\nstate_dir = "{tmp_path / "state"}"\n\n[training]\n{training}\n')
    return path


def test_an_unknown_encoding_is_refused_in_one_line_that_lists_the_known_ones(tmp_path: Path) -> None:
    path = _config(tmp_path, 'encoding = "int3"')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    known = ", ".join(codecs.names("update"))
    assert str(info.value) == f"{path}: training.encoding must be one of {known}, not 'int3'"
    with pytest.raises(ConfigError, match="not 'float32'"):  # a downlink encoding is no update codec
        load_config(_config(tmp_path, 'encoding = "float32"'))


def test_every_update_codec_is_a_valid_plan_and_travels_in_the_announcement(tmp_path: Path) -> None:
    for name in codecs.names("update"):
        config = load_config(_config(tmp_path, f'encoding = "{name}"'))
        assert config.training.encoding == name
        announcement = RoundAnnouncement(federation="f", round=1, model_hash="h", model_topic="t",
                                         weights_topic="w", selection=choose(["a"], 1, "00" * 16)[1], deadline=1.0,
                                         plan=config.training)
        assert from_json(RoundAnnouncement, to_json(announcement)).plan.encoding == name
    assert TrainingPlan().encoding == "int8"  # the wire default: an announcement without the field


def test_devices_that_cannot_produce_the_plans_encoding_are_not_selected(tmp_path: Path) -> None:
    config = AggregatorConfig(federation=FederationSection(name="f", state_dir=str(tmp_path / "state")))
    aggregator = Aggregator(config)
    now = time.time()
    aggregator.fleet.update(DeviceStatus("old", "online", eligible=True, updated_at=now))  # no encodings: int8 only
    aggregator.fleet.update(DeviceStatus("new", "online", eligible=True, encodings=["int8", "ternary-ef"],
                                         updated_at=now))
    aggregator.fleet.update(DeviceStatus("busy", "online", eligible=False, encodings=["int8", "ternary-ef"],
                                         updated_at=now))
    assert aggregator.selectable() == []  # the default plan (int4): neither lists it
    aggregator.config.training.encoding = "int8"
    assert aggregator.selectable() == ["new", "old"]
    aggregator.config.training.encoding = "ternary-ef"
    assert aggregator.selectable() == ["new"]
