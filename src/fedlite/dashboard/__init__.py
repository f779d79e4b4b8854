"""The operator's web dashboard: rounds, fleet, KPIs, registry and rollouts, live."""
