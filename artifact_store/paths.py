"""tinker://<training_run_id>/<kind>/<name> paths and the S3 keys behind them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

CheckpointKind = Literal["weights", "sampler_weights", "external_weights"]
# Path segment -> the SDK's checkpoint_type. external_weights: a PEFT adapter exported for use outside tinker
# (save_weights_external), laid out like sampler weights.
CHECKPOINT_TYPES: dict[str, str] = {"weights": "training", "sampler_weights": "sampler",
                                    "external_weights": "external"}
_NAME = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._:-]{0,127}$")


class InvalidPath(ValueError):
    pass


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise InvalidPath(f"checkpoint name {name!r} must be 1-128 of [A-Za-z0-9._:-] (no '/')")
    return name


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: CheckpointKind
    name: str

    @classmethod
    def parse(cls, path: str) -> TinkerPath:
        if not path.startswith("tinker://"):
            raise InvalidPath(f"{path!r} is not a tinker:// path")
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or not all(parts):
            raise InvalidPath(f"{path!r} must be tinker://<run_id>/<weights|sampler_weights|external_weights>/<name>")
        run_id, kind, name = parts
        if kind not in CHECKPOINT_TYPES:
            raise InvalidPath(f"{path!r}: kind must be one of {', '.join(CHECKPOINT_TYPES)}, got {kind!r}")
        return cls(run_id, kind, check_name(name))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def prefix(self) -> str:
        """S3 prefix of this checkpoint: its manifest and its versioned files live below."""
        return f"runs/{self.run_id}/{self.kind}/{self.name}/"


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"
