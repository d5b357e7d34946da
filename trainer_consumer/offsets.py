"""Which offsets the trainer may commit: per partition, up to (not including) the lowest offset whose event is
not finished yet. An event is finished once it is applied and replied, dead-lettered, or answered as a duplicate;
so a crash re-delivers every event whose effects were not yet visible, and none that were."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class PartitionOffsets:
    unfinished: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset received
    committed: int | None = None

    def committable(self) -> int | None:
        return min(self.unfinished) if self.unfinished else self.next_offset


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}

    def received(self, tp: TopicPartition, offset: int) -> None:
        part = self._partitions.setdefault(tp, PartitionOffsets())
        part.unfinished.add(offset)
        part.next_offset = max(part.next_offset or 0, offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        part = self._partitions.get(tp)
        if part is not None:  # a revoked partition is forgotten; its late completions do not matter here
            part.unfinished.discard(offset)

    def unfinished(self, tp: TopicPartition) -> int:
        part = self._partitions.get(tp)
        return len(part.unfinished) if part else 0

    def to_commit(self, only: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        out = {}
        for tp, part in self._partitions.items():
            offset = part.committable()
            if (only is None or tp in only) and offset is not None and offset != part.committed:
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._partitions.pop(tp, None)
