"""fedlite: federated learning for fleets of small devices over MQTT."""

__version__ = "0.1.0"
