"""Per-row LoRA: every row of a batch may use a different adapter (or none), in one forward pass.

Each nn.Linear of the base model is wrapped once in `MultiLoraLinear`. For a batch, `LoraBank.activate`
packs the k distinct adapters of the batch side by side per module (A: [k*r, in], B: [out, k*r], the
LoRA scale folded into B, ranks zero-padded to a common r) and sets a row mask [rows, k*r] that selects
each row's block. The forward is then two dense matmuls with static shapes (no per-adapter Python loop),
so it batches well and compiles; padded ranks and other rows' blocks contribute exact zeros.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the engine (and the GPU benchmark) runs without the S3 client installed
    from artifact_store import Checkpoint

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter checkpoint this sampler cannot apply (the message names what is wrong)."""


@dataclass
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraAdapter:
    """One adapter, parsed and on the model's device. `key` = (tinker path, manifest version)."""

    key: tuple[str, str]
    modules: dict[str, LoraModule]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


class _RowMask:
    """Shared by every wrapper: which packed LoRA block each row of the current batch uses."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [rows, k*r]


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: _RowMask) -> None:
        super().__init__()
        self.base = base
        self.lora_a: torch.Tensor | None = None  # [k*r, in]
        self.lora_b: torch.Tensor | None = None  # [out, k*r], scale folded in
        object.__setattr__(self, "_rows", rows)  # shared, so not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:  # transformers reads lm_head.weight (tying, dtype checks)
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.lora_a is None or self._rows.mask is None:
            return out
        mask = self._rows.mask
        hidden = F.linear(x, self.lora_a)  # [rows, T, k*r]
        hidden = hidden * (mask.unsqueeze(1) if hidden.dim() == 3 else mask)
        return out + F.linear(hidden, self.lora_b)


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(config: dict) -> None:
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "lora_bias": bool(config.get("lora_bias")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise AdapterError(f"adapter_config sets {', '.join(bad)}, which the sampler does not support")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter_config.peft_type must be LORA, got {config.get('peft_type')!r}")


class LoraBank:
    """The wrapped model's LoRA state: parses adapters for it and activates a batch's adapters."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device, self.dtype = device, dtype
        self.rows = _RowMask()
        self.wrappers: dict[str, MultiLoraLinear] = {}
        self._active: tuple | None = None
        targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = MultiLoraLinear(linear, self.rows)
            setattr(parent, child, wrapper)
            self.wrappers[name] = wrapper

    # ------------------------------------------------------------------ parsing
    def parse(self, ckpt: Checkpoint, key: tuple[str, str]) -> LoraAdapter:
        config = ckpt.adapter_config
        _check_config(config)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in ckpt.adapter_weights.items():
            match = _LORA_KEY.match(name)
            if match is None:
                self._check_unchanged_base_weight(name, tensor)
                continue
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        if not pairs:
            raise AdapterError("adapter_model.safetensors holds no lora_A/lora_B weights")
        modules = {name: self._parse_module(name, ab, config) for name, ab in pairs.items()}
        return LoraAdapter(key=key, modules=modules, rank=max(m.a.shape[0] for m in modules.values()))

    def _parse_module(self, name: str, ab: dict[str, torch.Tensor], config: dict) -> LoraModule:
        wrapper = self.wrappers.get(name)
        if wrapper is None:
            raise AdapterError(f"adapter targets {name!r}, which is not a Linear layer of the base model")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter module {name!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        a, b = ab["A"], ab["B"]
        rank = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", a.shape[0])))
        if a.shape != (rank, wrapper.in_features) or b.shape != (wrapper.out_features, rank):
            raise AdapterError(
                f"adapter module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"rank {rank} and the base layer ({wrapper.out_features} x {wrapper.in_features})")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return LoraModule(a=a.to(self.device, self.dtype), b=b.to(self.device, self.dtype), scale=scale)

    def _check_unchanged_base_weight(self, name: str, tensor: torch.Tensor) -> None:
        """PEFT saves the (untouched) embedding matrix when lm_head/embed_tokens is a LoRA target; accept it
        only if it equals the base model's, since this sampler applies LoRA deltas, not replaced weights."""
        module_name, _, leaf = name.removeprefix(_PEFT_PREFIX).rpartition(".")
        module_name = module_name.removesuffix(".base_layer")  # PEFT's name for the layer it wraps
        if module_name in self.wrappers:  # the Linear now lives inside its wrapper
            module_name = f"{module_name}.base"
        try:
            base = self.model.get_parameter(f"{module_name}.{leaf}")
        except AttributeError:
            raise AdapterError(f"adapter weight {name!r} is neither a LoRA weight nor a base-model weight") from None
        # Compared at the sampler's precision: a bf16 sampler accepts the fp32 original of its own weights.
        if base.shape != tensor.shape or not torch.equal(base.detach(), tensor.to(base.device, base.dtype)):
            raise AdapterError(f"adapter replaces base weight {name!r}; only LoRA deltas are supported")

    # ------------------------------------------------------------------ activation
    def activate(self, adapters: Sequence[LoraAdapter | None], *, pad_to_bucket: bool = False) -> None:
        """Make row i of the next forward passes use `adapters[i]` (None = the base model)."""
        distinct: list[LoraAdapter] = []
        for adapter in adapters:
            if adapter is not None and all(adapter is not d for d in distinct):
                distinct.append(adapter)
        if not distinct:
            self._pack([], 0, 0)
            self.rows.mask = None
            return
        rank = max(a.rank for a in distinct)
        slots = len(distinct)
        if pad_to_bucket:  # fewer distinct shapes -> fewer recompilations of the static decode step
            rank = -(-rank // 8) * 8
            slots = 1 << (slots - 1).bit_length()
        self._pack(distinct, rank, slots)
        mask = torch.zeros(len(adapters), slots * rank, device=self.device, dtype=self.dtype)
        for row, adapter in enumerate(adapters):
            if adapter is not None:
                slot = next(i for i, d in enumerate(distinct) if d is adapter)
                mask[row, slot * rank:(slot + 1) * rank] = 1
        self.rows.mask = mask

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / repeat rows (num_samples expansion, finished rows dropped) like the KV cache does."""
        if self.rows.mask is not None:
            self.rows.mask = self.rows.mask.index_select(0, index.to(self.device))

    @contextlib.contextmanager
    def only_row(self, row: int) -> Iterator[None]:
        """Forward passes inside see just `row` of the current batch (per-request prompt logprobs)."""
        saved = self.rows.mask
        if saved is not None:
            self.rows.mask = saved[row:row + 1]
        try:
            yield
        finally:
            self.rows.mask = saved

    def pad_rows(self, rows: int) -> None:
        """Extra rows (static-cache padding) use no adapter."""
        if self.rows.mask is not None and self.rows.mask.shape[0] < rows:
            self.rows.mask = F.pad(self.rows.mask, (0, 0, 0, rows - self.rows.mask.shape[0]))

    def _pack(self, distinct: list[LoraAdapter], rank: int, slots: int) -> None:
        signature = (tuple(a.key for a in distinct), rank, slots)
        if signature == self._active:
            return  # consecutive batches usually share their adapters
        for name, wrapper in self.wrappers.items():
            used = [(i, a.modules[name]) for i, a in enumerate(distinct) if name in a.modules]
            if not used:
                wrapper.lora_a = wrapper.lora_b = None
                continue
            a_packed = torch.zeros(slots * rank, wrapper.in_features, device=self.device, dtype=self.dtype)
            b_packed = torch.zeros(wrapper.out_features, slots * rank, device=self.device, dtype=self.dtype)
            for slot, module in used:
                r = module.a.shape[0]
                a_packed[slot * rank:slot * rank + r] = module.a
                b_packed[:, slot * rank:slot * rank + r] = module.b * module.scale
            wrapper.lora_a, wrapper.lora_b = a_packed, b_packed
        self._active = signature
