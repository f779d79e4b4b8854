"""fedlite.broker_config."""
