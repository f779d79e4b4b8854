"""fedlite.model_export."""
