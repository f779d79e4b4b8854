"""Several aggregators on one federation: members share the updates ($share), one coordinator merges their sums."""
