"""Topic names and partition counts. All topics are created up front: Tansu cannot add partitions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str = "tinker-bus"
    train_partitions: int = 8
    sample_partitions: int = 4
    reply_partitions: int = 4
    dead_letter_partitions: int = 1

    @property
    def train(self) -> str:
        return f"{self.prefix}.train.requests"

    @property
    def sample(self) -> str:
        return f"{self.prefix}.sample.requests"

    @property
    def replies(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}.dead-letter"

    def all(self) -> dict[str, int]:
        return {
            self.train: self.train_partitions,
            self.sample: self.sample_partitions,
            self.replies: self.reply_partitions,
            self.dead_letter: self.dead_letter_partitions,
        }
