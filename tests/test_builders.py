"""A user's own architecture (`--builder` / `[model] builder`): found the same way by export and the aggregator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlite.aggregator.config import load_config
from fedlite.settings import ConfigError

BUILDER = '''
from fedlite.model_export.architectures import build

def small_mlp(input_shape, classes, **options):
    return build("mlp", input_shape, classes, hidden=[16])
'''


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_models.py").write_text(BUILDER)
    return project


def _config(folder: Path, builder: str) -> Path:
    path = folder / "aggregator.toml"
    path.write_text(f'[federation]\nname = "f"\n[model]\narch = "small"\ninput_shape = [8]\nclasses = 3\n'
                    f'builder = "{builder}"\n')
    return path


def test_the_aggregator_finds_a_builder_beside_its_config_from_any_directory_and_export_finds_it_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlite.aggregator.export import export_round

    project = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a service does not run in the project's directory
    for spec in ("my_models:small_mlp", "my_models.py:small_mlp"):
        config = load_config(_config(project, spec))
        assert config.model.builder == f"{project / 'my_models.py'}:small_mlp"
    manifest = export_round(config.model, tmp_path / "round-0", None, None)
    assert manifest["arch"] == "small" and manifest["num_params"] == 8 * 16 + 16 + 16 * 3 + 3

    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "export", "--builder", "my_models:small_mlp",
                             "--input-shape", "8", "--classes", "3", "--out", str(tmp_path / "export")],
                            cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{8 * 16 + 16 + 16 * 3 + 3} params" in result.stdout


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:build", "no module 'no_such_module'"),
    ("my_models:missing", "my_models has no function 'missing'"),
    ("my_models", "must be MODULE:FUNCTION"),
    ("absent.py:build", "does not exist"),
])
def test_a_builder_that_cannot_be_found_is_a_one_line_config_error(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_config(_project(tmp_path), spec))
    assert "\n" not in str(info.value)


def test_export_names_a_builder_it_cannot_find_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "export", "--builder", "nowhere:fn",
                             "--input-shape", "8", "--classes", "3", "--out", str(tmp_path / "x")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"fedlite export: no module 'nowhere' on the Python path, nor {tmp_path}/nowhere.py"
