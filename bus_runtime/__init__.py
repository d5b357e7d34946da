"""The runtime floor every part stands on: settings and env-config loading, Kafka I/O with the Tansu rules, dead
letters, offsets, heartbeats, base-model resolution, free ports. It imports no gateway, worker or CLI code."""
