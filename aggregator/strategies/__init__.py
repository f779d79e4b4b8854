"""Server-side aggregation strategies, one per module."""
