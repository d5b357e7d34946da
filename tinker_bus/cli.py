"""`tinker-bus`: `up` runs the whole local stack; `gateway`, `trainer`, `sampler`, `metrics` run one part each;
`replay`, `export-log` and `export-metrics` read a model's event log back.

Settings come from TINKER_BUS_* environment variables (bus_runtime.settings.BusSettings.from_env); a flag
overrides its variable. The original server's PORT (gateway port) and USE_MEGATRON=true (trainer backend
megatron) keep working.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bus_runtime.env_config import parse_bool
from bus_runtime.settings import BusSettings
from tinker_bus.args import UsageError, bus_options, settings_from_args
from tinker_bus.launcher import StackOptions, StartupError, prepare_bus, run_stack

log = logging.getLogger("tinker_bus")

# --backend name -> trainer_consumer.config.TrainerConfig.backend (read from TINKER_BUS_TRAINER_BACKEND)
BACKENDS = {"hf": "hf_peft", "megatron": "megatron"}
DEFAULT_GATEWAY_PORT = 8000


# ---------------------------------------------------------------------- arguments -> settings


def gateway_port(args: argparse.Namespace) -> int:
    """--port, else the original server's PORT variable, else 8000."""
    if args.port is not None:
        return args.port
    raw = os.environ.get("PORT")
    if not raw:
        return DEFAULT_GATEWAY_PORT
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"PORT={raw!r} is not a port number") from None


def api_keys(args: argparse.Namespace) -> dict[str, str] | None:
    """--api-key flags plus TINKER_BUS_API_KEYS (comma-separated); None means development mode."""
    from bus_gateway.auth import api_keys_from_env

    try:
        return api_keys_from_env(args.api_key or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------------- subcommands


def cmd_up(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    options = StackOptions(
        data_dir=Path(args.data_dir).expanduser().resolve(),
        gateway_port=gateway_port(args),
        ephemeral=args.ephemeral,
        broker_port=args.broker_port,
        s3_port=args.s3_port,
        external_kafka=args.kafka_bootstrap is not None,
        external_s3=args.s3_endpoint is not None,
        api_keys=api_keys(args),
        health_timeout_s=args.health_timeout,
        log_level=args.log_level,
        trainer_env=trainer_backend_env(args),
        metrics=args.metrics,
        gateways=args.gateways,
    )
    # This process talks through the rich console; library INFO lines would only interleave with it.
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    return run_stack(settings, options)


def cmd_gateway(args: argparse.Namespace) -> int:
    from bus_gateway.server import make_server, shared_port_socket

    settings = settings_from_args(args)
    asyncio.run(prepare_bus(settings))
    server = make_server(settings, api_keys=api_keys(args), port=gateway_port(args), host=args.host,
                         log_level=args.log_level.lower())
    log.info("gateway on http://%s:%d (Kafka %s, S3 %s)", args.host, gateway_port(args),
             settings.kafka_bootstrap, settings.s3_endpoint)
    # uvicorn handles SIGINT / SIGTERM itself: it stops accepting, drains, runs the app's shutdown hooks.
    server.run(sockets=[shared_port_socket(args.host, gateway_port(args))] if args.reuse_port else None)
    return 0


def trainer_backend(args: argparse.Namespace) -> str | None:
    """--backend, else USE_MEGATRON=true, as a TrainerConfig.backend name; None leaves the config's own."""
    try:
        megatron = parse_bool(os.environ.get("USE_MEGATRON") or "false", "USE_MEGATRON")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    backend = args.backend or ("megatron" if megatron else None)
    return BACKENDS[backend] if backend else None


def trainer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainerConfig fields that flags set (--backend / USE_MEGATRON, --tensor-parallel), checked together
    with the TINKER_BUS_TRAINER_* variables they override: tensor parallelism is the Megatron backend's alone."""
    from trainer_consumer.config import TrainerConfig

    overrides: dict[str, Any] = {}
    backend = trainer_backend(args)
    if backend:
        overrides["backend"] = backend
    if args.tensor_parallel is not None:
        if args.tensor_parallel < 1:
            raise UsageError(f"--tensor-parallel must be at least 1, got {args.tensor_parallel}")
        overrides["megatron_tp_size"] = args.tensor_parallel
    try:
        config = TrainerConfig.from_env(**overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if config.megatron_tp_size > 1 and config.backend != "megatron":
        raise UsageError(f"--tensor-parallel {config.megatron_tp_size} (TINKER_BUS_TRAINER_MEGATRON_TP_SIZE) needs "
                         f"--backend megatron; the trainer backend is {config.backend!r}")
    return overrides


def trainer_backend_env(args: argparse.Namespace) -> dict[str, str]:
    """trainer_overrides as the child trainer's TINKER_BUS_TRAINER_* variables; {} leaves them be."""
    from trainer_consumer.config import ENV_PREFIX

    return {f"{ENV_PREFIX}{name.upper()}": str(value) for name, value in trainer_overrides(args).items()}


def cmd_trainer(args: argparse.Namespace) -> int:
    from trainer_consumer.config import TrainerConfig
    from trainer_consumer.worker import run_trainer

    config = TrainerConfig.from_env(**trainer_overrides(args))
    return _serve_worker("trainer", functools.partial(run_trainer, config=config), settings_from_args(args))


def cmd_sampler(args: argparse.Namespace) -> int:
    from sampler_consumer.worker import run_sampler

    return _serve_worker("sampler", run_sampler, settings_from_args(args))


def cmd_metrics(args: argparse.Namespace) -> int:
    from metrics_stream.worker import ROLE, run_metrics

    return _serve_worker(ROLE, run_metrics, settings_from_args(args))


WorkerFn = Callable[..., Coroutine[Any, Any, None]]


def _serve_worker(role: str, run: WorkerFn, settings: BusSettings) -> int:
    """Run a worker coroutine until SIGINT / SIGTERM cancels it (so it leaves its group and heartbeat cleanly)."""

    async def main() -> None:
        await prepare_bus(settings)
        ready = asyncio.Event()
        worker = asyncio.create_task(run(settings, ready=ready))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.cancel)
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({worker, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            group = {"trainer": settings.trainer_group, "sampler": settings.sampler_group}.get(role, "of its own")
            log.info("%s ready (Kafka %s, group %s, base models %s)", role, settings.kafka_bootstrap, group,
                     ", ".join(settings.base_models))
        ready_wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        log.info("%s stopped", role)

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------------- parser


def _gateway_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help=f"gateway port (default: $PORT, else {DEFAULT_GATEWAY_PORT})")
    parser.add_argument("--api-key", action="append", metavar="KEY[=TENANT]",
                        help="accepted API key, tml-... (repeatable; added to $TINKER_BUS_API_KEYS). None at all: "
                             "development mode, any tml- key is tenant 'default'")


def _backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=list(BACKENDS),
                        help="trainer backend: hf (transformers + PEFT) or megatron (megatron-core); default "
                             "megatron if USE_MEGATRON=true, else $TINKER_BUS_TRAINER_BACKEND, else hf")
    parser.add_argument("--tensor-parallel", type=int, metavar="N",
                        help="megatron only: shard the model over N GPUs of this host, one process per GPU driven "
                             "by the trainer's Kafka consumer (default $TINKER_BUS_TRAINER_MEGATRON_TP_SIZE, else 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinker-bus", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=os.environ.get("TINKER_BUS_LOG_LEVEL", "INFO").upper(),
                        type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default $TINKER_BUS_LOG_LEVEL, else INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", parents=[common], help="start the whole local stack and wait until /healthz is healthy")
    up.add_argument("--data-dir", default=".tinker-bus", help="where S3 data and logs live (default ./.tinker-bus)")
    up.add_argument("--ephemeral", action="store_true", help="memory broker: the event log is lost on stop")
    up.add_argument("--broker-port", type=int, default=9092, help="local Tansu port, 0 = any free (default 9092)")
    up.add_argument("--s3-port", type=int, default=9000, help="local SeaweedFS S3 port, 0 = any free (default 9000)")
    up.add_argument("--health-timeout", type=float, default=600.0, metavar="SECONDS",
                    help="give up if /healthz is not healthy by then (default 600)")
    up.add_argument("--gateways", type=int, default=1, metavar="N",
                    help="gateway processes sharing the port (SO_REUSEPORT); more for many concurrent SDK calls")
    up.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                    help="run the metrics part (dashboard curves); --no-metrics where faust-streaming is absent")
    _gateway_options(up)
    _backend_option(up)
    bus_options(up, for_up=True)
    up.set_defaults(func=cmd_up)

    gateway = sub.add_parser("gateway", parents=[common], help="the HTTP gateway (Tinker API) alone")
    gateway.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    gateway.add_argument("--reuse-port", action="store_true",
                         help="share the port with other gateway processes (SO_REUSEPORT; `up --gateways N`)")
    _gateway_options(gateway)
    bus_options(gateway, for_up=False)
    gateway.set_defaults(func=cmd_gateway)

    trainer = sub.add_parser("trainer", parents=[common], help="one trainer (more processes: more group members)")
    _backend_option(trainer)
    bus_options(trainer, for_up=False)
    trainer.set_defaults(func=cmd_trainer)

    sampler = sub.add_parser("sampler", parents=[common], help="one sampler consumer")
    bus_options(sampler, for_up=False)
    sampler.set_defaults(func=cmd_sampler)

    metrics = sub.add_parser("metrics", parents=[common],
                             help="the metrics stream: per-model curves from the log, as JSON (more processes: "
                                  "more replicas)")
    bus_options(metrics, for_up=False)
    metrics.set_defaults(func=cmd_metrics)

    from tinker_bus.log_tools import add_log_commands  # replay and export-log: reading the log back

    add_log_commands(sub, common)
    from tinker_bus.export_model import add_export_command  # export: a checkpoint merged into its base model

    add_export_command(sub, common)

    from tinker_bus.metrics_export import add_metrics_commands

    add_metrics_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:
        parser.error(str(exc))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0
