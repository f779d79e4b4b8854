"""fedlite.model_export: architectures, trainable TFLite export and the model manifest (TensorFlow loaded lazily)."""

from fedlite.protocol.manifest import ManifestError, flatten, load_manifest, unflatten

from . import layer_stack  # noqa: F401  (registers the `keras` architecture)
from .architectures import ModelDef, available, build, register_architecture
from .keras_import import KerasImportError, from_keras

__all__ = ["KerasImportError", "ModelDef", "ManifestError", "available", "build", "export_model", "flatten",
           "from_keras", "load_manifest", "register_architecture", "unflatten"]


def __getattr__(name: str):
    if name == "export_model":
        from .convert import export_model

        return export_model
    raise AttributeError(name)
