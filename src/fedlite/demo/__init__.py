"""fedlite.demo."""
