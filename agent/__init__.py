"""fedlite.agent."""
