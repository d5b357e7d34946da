"""Rebuilding one model from the event log through the live trainer's own code path (`tinker-bus replay`):
run.py drives the engine over the records, report.py types and compares what it did."""

from trainer_consumer.replay.report import ReplayReport
from trainer_consumer.replay.run import AppliedProgress, ReplayError, ReplayRequest, replay_model

__all__ = ["AppliedProgress", "ReplayError", "ReplayReport", "ReplayRequest", "replay_model"]
