"""What every tinker-bus command shares: bus and storage flags, and turning them into BusSettings."""

from __future__ import annotations

import argparse
from typing import Any

from bus_events import Topics
from bus_runtime.settings import BusSettings


class UsageError(ValueError):
    pass


def settings_from_args(args: argparse.Namespace) -> BusSettings:
    """BusSettings.from_env with every flag that was given on top."""
    overrides: dict[str, Any] = {}
    for flag in ("kafka_bootstrap", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_secure", "bucket",
                 "device"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    if getattr(args, "topic_prefix", None):
        overrides["topics"] = Topics(prefix=args.topic_prefix)
    if getattr(args, "base_models", None):
        overrides["base_models"] = tuple(args.base_models)
    settings = BusSettings.from_env(**overrides)
    if not settings.base_models:
        raise UsageError("no base model: pass --base-model or set TINKER_BUS_BASE_MODELS")
    return settings


def bus_options(parser: argparse.ArgumentParser, *, for_up: bool) -> None:
    g = parser.add_argument_group("bus and storage (each defaults to its TINKER_BUS_* variable)")
    g.add_argument("--kafka-bootstrap", metavar="HOST:PORT",
                   help="use this existing Kafka instead of starting Tansu" if for_up else "Kafka bootstrap servers")
    g.add_argument("--s3-endpoint", metavar="HOST:PORT",
                   help="use this existing S3 / MinIO instead of starting SeaweedFS" if for_up else "S3 / MinIO")
    g.add_argument("--s3-access-key")
    g.add_argument("--s3-secret-key")
    g.add_argument("--s3-secure", action=argparse.BooleanOptionalAction, default=None, help="HTTPS to S3")
    g.add_argument("--bucket", help="bucket for checkpoints, registry and claim checks")
    g.add_argument("--topic-prefix", help="topic names are PREFIX.train.requests etc.")
    g.add_argument("--base-model", dest="base_models", action="append", metavar="NAME_OR_DIR",
                   help="base model that may be trained and sampled (repeatable); "
                        "default HuggingFaceTB/SmolLM2-135M-Instruct")
    g.add_argument("--device", help="torch device of the trainer and sampler (auto, cpu, cuda, cuda:1, ...)")
