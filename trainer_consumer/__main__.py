"""`python -m trainer_consumer`: run one trainer with settings from TINKER_BUS_* environment variables."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tinker_bus.settings import BusSettings
from trainer_consumer.worker import run_trainer


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_trainer(BusSettings.from_env()))


if __name__ == "__main__":
    main()
