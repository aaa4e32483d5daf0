"""Wiring: settings, the runtime that builds adapters from them, arrivals, PACS throttling, telemetry."""
