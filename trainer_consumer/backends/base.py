"""The one interface between the trainer engine and whatever runs the model (HF + PEFT today, Megatron later).

The engine owns ordering, dedupe, the window-failure rule, checkpoints and replies; a backend owns tensors. A
backend keeps one frozen base model per base-model name and any number of LoRA adapters on it, one per
model_id, each with its own optimizer state (AdamW or Dimuon, per `spec.optimizer`). Calls come from ONE thread
(the engine's compute thread), in the order the engine decided, so a backend needs no locking and must not
reorder anything.

Names are the contract between backends: adapter weights use PEFT key names (what `get_peft_model_state_dict`
writes, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") and optimizer state uses
"<peft key>.exp_avg", "<peft key>.exp_avg_sq" and "<peft key>.step" (AdamW; a Dimuon adapter's are
"<peft key>.momentum" and "<peft key>.step"), so a checkpoint written by one backend loads into another and into
`PeftModel.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from artifact_store.lora_targets import target_modules
from bus_events import payloads as p
from bus_runtime.base_models import BaseModelInfo

if TYPE_CHECKING:  # annotations only: the engine's scheduling core (stream.py) imports this module without torch
    import numpy as np
    import torch

# Tinker fixes alpha server-side; with alpha = 32 the LoRA scale alpha / rank is 1 at the default rank 32.
LORA_ALPHA = 32.0


class BackendInputError(ValueError):
    """The request itself is wrong (token id outside the vocabulary, misaligned shapes...): a "user" error."""


class UnknownModel(KeyError):
    """No adapter is loaded for this model_id."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter: the wire's LoraSpec (rank, blocks, with its seed resolved), its base model and alpha."""

    base_model: str
    lora: p.LoraSpec  # lora.seed is never None here: the engine resolves a missing seed (runtime.default_seed)
    alpha: float = LORA_ALPHA
    optimizer: str = "adamw"  # the family (bus_events OptimizerSpec.type), fixed for the adapter's life

    def __post_init__(self) -> None:
        if self.lora.seed is None:
            raise ValueError("an AdapterSpec needs a resolved seed (lora.seed is None)")

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def seed(self) -> int:
        assert self.lora.seed is not None
        return self.lora.seed

    @property
    def target_modules(self) -> list[str]:
        return target_modules(self.lora.train_attn, self.lora.train_mlp, self.lora.train_unembed)


@dataclass
class ForwardBackwardOutput:
    logprobs: list[np.ndarray]  # per datum, float32 [N]: log p(target_tokens[t]) at EVERY position
    metrics: dict[str, float]  # the loss's metrics, keys "name:reduction", always "loss:sum"


@dataclass
class AdapterExport:
    """An adapter as files: PEFT `adapter_config.json` content and PEFT-named CPU tensors."""

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]


@dataclass(frozen=True)
class FbRequest:
    """One model's forward_backward, as `forward_backward_many` takes it."""

    model_id: str
    data: Sequence[p.Datum]
    loss_fn: str
    loss_fn_config: Mapping[str, float | str]
    forward_only: bool


class TrainingBackend(Protocol):
    """What the engine needs from a training backend. Every method is synchronous and may take long."""

    def base_model_info(self, base_model: str) -> BaseModelInfo:
        """Load the base model if needed (frozen, bf16 on GPU / fp32 on CPU) and describe it (from its config.json:
        bus_runtime.base_models.info_from_config, the one vocabulary rule)."""
        ...

    def create_adapter(self, model_id: str, spec: AdapterSpec) -> None:
        """A fresh adapter initialised deterministically from `spec.seed`, with a fresh state of its optimizer
        family (`spec.optimizer`)."""
        ...

    def remove_adapter(self, model_id: str) -> None:
        """Drop the adapter, its gradients and its optimizer state (no-op if unknown)."""
        ...

    def forward_backward(self, model_id: str, data: Sequence[p.Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float | str], forward_only: bool) -> ForwardBackwardOutput:
        """Per-datum target logprobs and the loss (via loss_plugins.compute_loss, SUM-reduced over all tokens of
        all datums). Unless `forward_only`, ADD the loss's gradients to the adapter's accumulated gradients.
        Raises BackendInputError (or loss_plugins.LossInputError / UnknownLoss) for bad input."""
        ...

    def optim_step(self, model_id: str, params: p.AdamParams | p.DimuonParams) -> dict[str, float]:
        """One step of the adapter's optimizer family (AdamW: decoupled weight decay; Dimuon: backends/dimuon.py;
        global-norm clipping when grad_clip_norm > 0) over the accumulated gradients, then zero them. Returns
        float metrics, at least grad_norm and learning_rate."""
        ...

    def discard_gradients(self, model_id: str) -> None:
        """Forget the accumulated gradients without touching weights or optimizer state."""
        ...

    def export_adapter(self, model_id: str) -> AdapterExport:
        """The adapter's current weights (a snapshot: later steps must not change the returned tensors)."""
        ...

    def export_optimizer(self, model_id: str) -> dict[str, torch.Tensor]:
        """The optimizer state: AdamW moments keyed "<peft key>.exp_avg|exp_avg_sq|step", or Dimuon's
        "<peft key>.momentum|step" (empty before the first step)."""
        ...

    def load_adapter(self, model_id: str, weights: Mapping[str, torch.Tensor],
                     optimizer_state: Mapping[str, torch.Tensor] | None) -> None:
        """Overwrite an existing adapter's weights (PEFT names) and, if given, its optimizer state; else reset the
        optimizer. Raises BackendInputError when names or shapes do not match the adapter."""
        ...

    def close(self) -> None:
        """Release what the backend holds beyond this process's memory (worker processes, process groups). Called
        once, on the compute thread after its last call, when the trainer shuts down."""
        ...


def forward_backward_many(backend: TrainingBackend, requests: Sequence[FbRequest]
                          ) -> list[ForwardBackwardOutput | Exception]:
    """The forward_backwards of several models (at most one each), each one's output or its error, in order.

    The seam for batched multi-adapter training: the engine calls this, today with one request per call, and it
    runs them one by one. A backend that can run several adapters in one pass gets a `forward_backward_many`
    method of this signature and this function hands the whole batch to it; the engine then gathers the ready
    forward_backwards at the heads of several models' lanes (actions.py) into one call."""
    native = getattr(backend, "forward_backward_many", None)
    if native is not None:
        return native(requests)
    out: list[ForwardBackwardOutput | Exception] = []
    for r in requests:
        try:
            out.append(backend.forward_backward(r.model_id, r.data, r.loss_fn, r.loss_fn_config, r.forward_only))
        except Exception as exc:  # one model's bad input fails that model's request only
            out.append(exc)
    return out
