"""`tinker-bus metrics`: per-model training and sampling curves, derived from the event log by a faust-streaming
app. Derived state only: every instance rebuilds it from offset 0 when it starts, and it is never a source of
truth (docs: README "Metrics")."""
