"""fedlite.aggregator."""
