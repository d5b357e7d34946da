"""The Tinker API as the official SDK 0.38 speaks it (tinker-protocol.md), split by area."""
