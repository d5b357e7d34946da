"""Shared runtime of tinker-bus: settings, Kafka I/O, local infrastructure, base models, the CLI."""
