"""Observability: counters over time, Prometheus metrics and the dashboard page."""
