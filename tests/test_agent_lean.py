"""The device side stays lean: the agent never loads TensorFlow, the aggregator or the exporter."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import fedlite.agent.cli, fedlite.agent.service, fedlite.runtime.trainer, fedlite.runtime.interpreter
from fedlite.runtime.interpreter import load_interpreter, runtime_name
runtime_name()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")
                        or m.startswith(("fedlite.aggregator", "fedlite.model_export", "fedlite.demo")))))
"""


def test_agent_imports_no_tensorflow_and_nothing_from_the_server_side():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_fedlite_agent_help_does_not_import_tensorflow():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedlite.cli", "agent", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--config" in result.stdout
    assert "tensorflow" not in result.stderr and "fedlite.aggregator" not in result.stderr


def test_a_server_command_on_an_agent_only_install_says_what_to_install_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    script = (
        "import importlib.abc, sys\n"
        "class NoServer(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'prometheus_client', 'sklearn'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoServer())\n"
        "from fedlite.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "agg.toml").write_text('[federation]\nname = "f"\n')
    for args in (["export", "--arch", "mlp", "--input-shape", "8", "--classes", "3", "--out", str(tmp_path / "m")],
                 ["aggregator", "--config", str(tmp_path / "agg.toml")]):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().endswith("pip install 'fedlite[server]'") and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


IDLE_PROBE = """
import json, sys
from fedlite.runtime.interpreter import runtime_name
import fedlite.agent.cli, fedlite.agent.service, fedlite.agent.supervisor, fedlite.agent.models
print(json.dumps([runtime_name(), sorted(m for m in sys.modules if m.split(".")[0] in ("ai_edge_litert",
                                                                                     "tflite_runtime", "numpy"))]))
"""


def test_the_runtime_is_named_without_importing_it_or_numpy() -> None:
    """The agent process: numpy and the runtime load only in its rounds' processes (`agent.worker`)."""
    out = subprocess.run([sys.executable, "-c", IDLE_PROBE], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ["ai-edge-litert", []]


HIDE_RUNTIMES = (
    "import importlib.abc, sys\n"
    "class NoRuntime(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name.split('.')[0] in ('ai_edge_litert', 'tflite_runtime'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, NoRuntime())\n"
    "from fedlite.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_an_agent_without_a_tflite_runtime_says_what_to_install_for_this_python_in_one_line(tmp_path) -> None:
    from fedlite.runtime.interpreter import missing_runtime_message

    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nclient_id = "d"\nfederation = "f"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[data]\nsource = "npz"\npath = "{tmp_path / "data.npz"}"\n[trust]\nallow_unsigned = true\n')
    agent = subprocess.run([sys.executable, "-c", HIDE_RUNTIMES, "agent", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    expected = missing_runtime_message()
    assert agent.returncode == 2, agent.stderr  # a config of the machine: fedlite-agent.service does not restart
    assert agent.stderr.splitlines() == [f"fedlite agent: {expected}"], agent.stderr
    major, minor = sys.version_info[:2]
    assert f"Python {major}.{minor}" in expected and "pip install 'fedlite[agent]'" in expected
    check = subprocess.run([sys.executable, "-c", HIDE_RUNTIMES, "agent", "--check", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert f"FAIL  runtime: {expected}" in check.stdout.splitlines() and check.returncode == 1, check.stdout


def test_the_missing_runtime_message_names_the_extra_that_has_wheels_for_the_python() -> None:
    from fedlite.runtime.interpreter import missing_runtime_message

    newer = missing_runtime_message((3, 12))
    assert "'fedlite[agent]'" in newer and "'fedlite[agent-legacy]' installs none on Python 3.12" in newer
    older = missing_runtime_message((3, 11))
    assert "'fedlite[agent-legacy]' (tflite-runtime 2.14 with numpy<2, Python 3.11)" in older
    assert "\n" not in newer + older


def test_an_installed_runtime_that_does_not_import_stops_the_agent_at_start_up_in_one_line(tmp_path) -> None:
    import os

    broken = tmp_path / "site" / "ai_edge_litert"  # shadows the real package, as a half-upgraded install would
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('numpy.core.multiarray failed to import')\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nclient_id = "d"\nfederation = "f"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[data]\nsource = "npz"\npath = "{tmp_path / "data.npz"}"\n[trust]\nallow_unsigned = true\n')
    env = os.environ | {"PYTHONPATH": str(tmp_path / "site")}
    agent = subprocess.run([sys.executable, "-m", "fedlite.cli", "agent", "--config", str(config)],
                           capture_output=True, text=True, timeout=60, env=env)
    assert agent.returncode == 2, agent.stderr
    assert agent.stderr.splitlines() == ["fedlite agent: ai-edge-litert is installed but does not import: "
                                         "ImportError: numpy.core.multiarray failed to import"], agent.stderr
