"""A blocking front of the engine core for one loaded base model: `Engine(base).generate(requests)`.

Used by benchmarks and tests; the Kafka sampler uses EngineCore directly. Each Engine has its own engine thread
(KV cache, graphs); the base model's LoRA slots are shared, so engines of one model must not run at once.
"""

from __future__ import annotations

from concurrent.futures import Future

from sampler_consumer.config import SamplerConfig
from sampler_consumer.engine_core import EngineCore, ModelEngine
from sampler_consumer.models import BaseModel
from sampler_consumer.requests import (  # noqa: F401 (re-exported: the engine's vocabulary)
    GenFailure,
    GenOutput,
    GenRequest,
    Sequence,
)


class GenerationFailed(RuntimeError):
    pass


class Engine:
    def __init__(self, base: BaseModel, config: SamplerConfig | None = None) -> None:
        self.base = base
        self.config = config or SamplerConfig()
        self.core = EngineCore(lambda _name: ModelEngine(base, self.config), capacity=1)

    def submit(self, request: GenRequest) -> Future:
        future: Future = Future()
        self.core.submit(self.base.name, request, future.set_result)
        return future

    def generate(self, requests: list[GenRequest]) -> list[GenOutput]:
        """Submit all at once (they batch together), wait for all; raise if any failed."""
        results = [future.result() for future in [self.submit(r) for r in requests]]
        for result in results:
            if isinstance(result, GenFailure):
                raise GenerationFailed(result.message)
        return results

    @property
    def model_engine(self) -> ModelEngine:
        return self.core.call(lambda core: core.engines[self.base.name]).result()

    def close(self) -> None:
        self.core.stop()
