"""Secure aggregation (SecAgg+, Bell et al., CCS 2020): the arithmetic both sides share, no transport."""
