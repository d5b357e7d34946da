"""`python -m tinker_bus` = the `tinker-bus` command (how `up` starts its child processes)."""

from tinker_bus.cli import main

raise SystemExit(main())
