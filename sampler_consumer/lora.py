"""Per-row LoRA: every row of a batch may use a different adapter (or none), in one forward pass.

Each nn.Linear of the base model is wrapped once in `MultiLoraLinear`, which owns a stack of adapter slots per
module (A: [slots, R, in], B: [out, R] per slot with the LoRA scale folded in, ranks zero-padded to R); slot 0 is
"no adapter" and stays empty. Loading an adapter copies it into a free slot, so the tensors a CUDA graph captured
never move: a new adapter (version) needs no new graph. A forward pass gets a `LoraPlan`: the batch's tokens
grouped into segments of one adapter slot each. On CUDA the segments become tiles of a segmented gather-matmul
(lora_kernels.py, Punica SGMV style: each tile reads only its own adapter); elsewhere each segment is two small
matmuls. Rows without an adapter cost nothing.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the engine (and the GPU benchmark) runs without the S3 client installed
    from artifact_store import Checkpoint
    from sampler_consumer.requests import GenRequest

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
    """One adapter, parsed (tensors in the model's dtype). `key` = (tinker path, manifest version)."""

    key: tuple[str, str]
    modules: dict[str, LoraModule]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


@dataclass
class LoraPlan:
    """Which adapter slot each token of the next forward passes uses: contiguous segments (start, end, slot)."""

    segments: list[tuple[int, int, int]]
    tiles: torch.Tensor | None = None  # [3, max_tiles] int32 (start, end, slot) for the segmented kernels

    @property
    def active(self) -> bool:
        return any(slot for _, _, slot in self.segments)


@dataclass
class _Current:
    """Shared by every wrapper: the plan of the forward pass in progress (None: base model only)."""

    plan: LoraPlan | None = None
    kernels: bool = False  # the segmented Triton kernels (CUDA), else per-segment matmuls
    slot_rank: list[int] = field(default_factory=list)


class MultiLoraLinear(nn.Module):
    _current: _Current  # declared for the type checker: set with object.__setattr__ below
    a_stack: torch.Tensor | None
    b_stack: torch.Tensor | None

    def __init__(self, base: nn.Linear, current: _Current) -> None:
        super().__init__()
        self.base = base
        self.a_stack: torch.Tensor | None = None  # [slots, R, in]
        self.b_stack: torch.Tensor | None = None  # [slots, out, R], scale folded in
        object.__setattr__(self, "_current", current)  # shared, so not registered as a submodule

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
        plan = self._current.plan
        if plan is None or self.a_stack is None or self.b_stack is None:
            return out
        flat_x, flat_out = x.reshape(-1, self.in_features), out.view(-1, self.out_features)
        if self._current.kernels:
            from sampler_consumer.lora_kernels import sgmv_expand, sgmv_shrink

            assert plan.tiles is not None, "the kernels need the plan's tiles"
            sgmv_expand(sgmv_shrink(flat_x, self.a_stack, plan.tiles), self.b_stack, plan.tiles, flat_out)
            return out
        for start, end, slot in plan.segments:
            rank = self._current.slot_rank[slot]
            if slot and rank:
                hidden = F.linear(flat_x[start:end], self.a_stack[slot, :rank])
                flat_out[start:end] += F.linear(hidden, self.b_stack[slot, :, :rank])
        return out


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
    """The wrapped model's LoRA state: parses adapters for it, holds the adapter slots, sets each pass's plan."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, *, slots: int = 17,
                 max_rank: int = 32) -> None:
        self.model = model
        self.device, self.dtype = device, dtype
        self.slots, self.max_rank = slots, max_rank
        self.current = _Current(slot_rank=[0] * slots)
        self.wrappers: dict[str, MultiLoraLinear] = {}
        self.adapters = AdapterSlots(self)  # one slot table per bank, whichever engine uses it
        targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapper = MultiLoraLinear(linear, self.current)
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
        if rank > self.max_rank:
            raise AdapterError(f"adapter module {name!r} has rank {rank}; this sampler serves ranks up to "
                               f"{self.max_rank} (TINKER_BUS_SAMPLER_MAX_LORA_RANK)")
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        return LoraModule(a=a.to(self.dtype), b=b.to(self.dtype), scale=scale)

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

    # ------------------------------------------------------------------ slots
    def _stacks(self, wrapper: MultiLoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
        if wrapper.a_stack is None:
            shape_a = (self.slots, self.max_rank, wrapper.in_features)
            shape_b = (self.slots, wrapper.out_features, self.max_rank)
            wrapper.a_stack = torch.zeros(shape_a, device=self.device, dtype=self.dtype)
            wrapper.b_stack = torch.zeros(shape_b, device=self.device, dtype=self.dtype)
        assert wrapper.b_stack is not None
        return wrapper.a_stack, wrapper.b_stack

    def allocate_all(self) -> None:
        """Every module's slot stack now (before CUDA graphs capture them); on CPU they come with first use."""
        for wrapper in self.wrappers.values():
            self._stacks(wrapper)

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        if not 0 < slot < self.slots:
            raise ValueError(f"adapter slot {slot} outside 1..{self.slots - 1}")
        for name, wrapper in self.wrappers.items():
            module = adapter.modules.get(name)
            if module is None:
                if wrapper.a_stack is not None and wrapper.b_stack is not None:  # no leak from the slot's last adapter
                    wrapper.a_stack[slot].zero_()
                    wrapper.b_stack[slot].zero_()
                continue
            a_stack, b_stack = self._stacks(wrapper)
            r = module.a.shape[0]
            a_stack[slot].zero_()
            b_stack[slot].zero_()
            a_stack[slot, :r].copy_(module.a)
            b_stack[slot, :, :r].copy_(module.b.to(self.device) * module.scale)
        self.current.slot_rank[slot] = adapter.rank

    def plan(self, plan: LoraPlan | None) -> None:
        """Make the next forward passes use `plan` (None or no adapter segment: the base model alone)."""
        self.current.plan = plan if plan is not None and plan.active else None


@dataclass
class SlotStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0


class AdapterSlots:
    """Which adapter (version) sits in which slot of a LoraBank; engine thread only.

    A slot in use by a running request is never evicted; the least recently used idle one is. When every slot is
    in use a request waits (acquire returns None) instead of failing."""

    def __init__(self, bank: LoraBank) -> None:
        self.bank = bank
        self.capacity = bank.slots - 1
        self.stats = SlotStats()
        self._slots: OrderedDict[tuple[str, str], int] = OrderedDict()  # least recently used first
        self._users = [0] * bank.slots
        self._free = list(range(bank.slots - 1, 0, -1))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Keys of the loaded adapters, least recently used first."""
        return iter(list(self._slots))

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def acquire(self, request: GenRequest) -> int | None:
        spec = request.adapter
        if spec is None:
            return 0
        slot = self._slots.get(spec.key)
        if slot is not None:
            self.stats.hits += 1
            self._slots.move_to_end(spec.key)
            self._users[slot] += 1
            return slot
        if not self._free and all(self._users[s] for s in self._slots.values()):
            return None
        adapter = spec if isinstance(spec, LoraAdapter) else self.bank.parse(spec.checkpoint, spec.key)
        if self._free:
            slot = self._free.pop()
        else:
            evicted = next(key for key, s in self._slots.items() if not self._users[s])
            slot = self._slots.pop(evicted)
            self.stats.evictions += 1
        self.bank.load(slot, adapter)
        self.stats.loads += 1
        self._slots[spec.key] = slot
        self._users[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        if slot:
            self._users[slot] -= 1
