"""The two parts of a Kafka hop that grow with a request's size, alone (issue 14): the broker's produce (send to
acknowledgement, a real Tansu on loopback, kafka_io.make_producer's producer) and a door's hand-over
(DoorBell.ring to DoorServer delivery, bus_runtime/doors.py), for a tiny request, a 2 x 2048 and an 8 x 2048 step.

    python -m bench.hop_parts            # p50 / p99 microseconds per size, each after 10 untimed rounds

Record sizes are those of the events before payload compression (a 1 x 8 forward ~450 B, 8 x 2048 tokens ~263 KB;
~45 KB compressed); the payload is random bytes, so nothing on the way compresses it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from bench.call_latency import percentile
from bus_runtime.doors import BusRecord, DoorBell, DoorServer
from bus_runtime.kafka_io import make_producer
from bus_runtime.settings import BusSettings
from tinker_bus.infra import TansuBroker

SIZES = (450, 66_000, 263_000)
WARMUP = 10


def _row(label: str, size: int, seconds: list[float]) -> str:
    micros = [1e6 * s for s in seconds[WARMUP:]]
    return f"  {label:<8} {size:>8} B  p50 {statistics.median(micros):8.0f} us  p99 {percentile(micros, 0.99):8.0f} us"


async def produce_latency(bootstrap: str, rounds: int) -> list[str]:
    producer = make_producer(BusSettings(kafka_bootstrap=bootstrap))
    await producer.start()
    try:
        rows = []
        for size in SIZES:
            value, times = os.urandom(size), []
            for _ in range(WARMUP + rounds):
                start = time.perf_counter()
                await producer.send_and_wait("hop-parts", value, key=b"model")
                times.append(time.perf_counter() - start)
            rows.append(_row("produce", size, times))
        return rows
    finally:
        await producer.stop()


async def door_latency(rounds: int) -> list[str]:
    delivered: asyncio.Queue[float] = asyncio.Queue()

    async def deliver(_record: BusRecord) -> None:
        delivered.put_nowait(time.perf_counter())

    server, bell = DoorServer("127.0.0.1", deliver), DoorBell()
    await server.start()
    try:
        rows = []
        for size in SIZES:
            record = BusRecord(value=os.urandom(size), headers=[], topic="hop-parts", partition=0, offset=0, key=b"m")
            times = []
            for _ in range(WARMUP + rounds):
                start = time.perf_counter()
                bell.ring(server.door, record)
                times.append(await delivered.get() - start)
            rows.append(_row("door", size, times))
        return rows
    finally:
        await bell.close()
        await server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    broker = TansuBroker()
    bootstrap = broker.start()
    try:
        rows = asyncio.run(produce_latency(bootstrap, args.rounds))
    finally:
        broker.stop()
    rows += asyncio.run(door_latency(args.rounds))
    print(f"one request at a time, {args.rounds} rounds per size:")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
