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
