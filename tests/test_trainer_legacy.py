"""The digits MLP trained on tflite-runtime 2.14 with numpy<2 (.venv-legacy), in its own process.

tflite-runtime fails when TensorFlow was imported first in the same process, so the model is
exported here and trained by a script run with .venv-legacy/bin/python.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers_models import digits_split

from fedlite.model_export.convert import export_model

ROOT = Path(__file__).resolve().parents[1]
LEGACY_PYTHON = ROOT / ".venv-legacy" / "bin" / "python"

DEVICE_SCRIPT = """
import json, sys
import numpy as np
from fedlite.runtime.interpreter import runtime_name
from fedlite.runtime.trainer import Trainer

model_dir, data_path = sys.argv[1], sys.argv[2]
data = np.load(data_path)
trainer = Trainer.from_dir(model_dir)
_, before = trainer.evaluate(data["x_test"], data["y_test"])
result = trainer.train_epochs(data["x_train"], data["y_train"], epochs=5, batch_size=32, lr=0.1,
                              rng=np.random.default_rng(0))
_, after = trainer.evaluate(data["x_test"], data["y_test"])
print(json.dumps({"runtime": runtime_name(), "numpy": np.__version__, "tensorflow": "tensorflow" in sys.modules,
                  "before": before, "accuracy": after, "steps": result.steps, "aborted": result.aborted}))
"""


def test_mlp_learns_digits_under_tflite_runtime(tmp_path: Path) -> None:
    if not LEGACY_PYTHON.exists():
        pytest.fail(f"{LEGACY_PYTHON} is missing: run scripts/setup-legacy to create the tflite-runtime environment")
    export_model("mlp", (64,), 10, tmp_path / "model")
    x_train, y_train, x_test, y_test = digits_split()
    np.savez(tmp_path / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    script = tmp_path / "device_train.py"
    script.write_text(DEVICE_SCRIPT)
    proc = subprocess.run([str(LEGACY_PYTHON), str(script), str(tmp_path / "model"), str(tmp_path / "digits.npz")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"digits MLP under {report['runtime']} (numpy {report['numpy']}): "
          f"accuracy {report['before']:.3f} -> {report['accuracy']:.3f}")
    assert report["runtime"] == "tflite-runtime"
    assert report["numpy"].startswith("1.") and not report["tensorflow"]
    assert report["steps"] == 5 * -(-len(x_train) // 32) and not report["aborted"]
    assert report["accuracy"] >= 0.90
