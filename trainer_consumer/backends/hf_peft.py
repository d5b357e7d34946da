"""TrainingBackend on transformers + PEFT: one frozen base per base-model name, one LoRA adapter per model_id.

- Base weights are frozen, bf16 on GPU and fp32 on CPU; adapters and their AdamW moments are fp32.
- PEFT multi-adapter, PEFT's module layout and checkpoint format, but not its adapter switching: each op points the
  LoRA layers at its model's weights (lora_compute.use), so adapters sharing a base never see each other's weights
  or gradients, and switching costs a pointer per layer instead of PEFT's requires_grad sweep over every adapter.
- LoRA targets: train_attn -> q/k/v/o_proj, train_mlp -> gate/up/down_proj, train_unembed -> lm_head (with tied
  embeddings the LoRA delta still applies to the output projection only), alpha fixed at LORA_ALPHA.
- Initialisation is ours, not PEFT's: each lora_A is drawn from a CPU generator seeded by (spec.seed, parameter
  name) with PEFT's default distribution, each lora_B is zero. The same seed therefore gives bit-identical adapters
  whatever else is loaded and in whatever order adapters were created (the basis of replay).
- LoRA runs through lora_compute.FusedLoraLinear: computed in the activations' dtype (bf16 on GPU) from the fp32
  adapter weights, the scaled add fused into one addmm.
- Logits never exist for a whole batch: hidden states go through lm_head in chunks (logprobs.py); with a frozen
  lm_head the chunks' gradient directions are kept instead of recomputing the logits.
- torch_compile (default on for CUDA unless deterministic): each decoder layer and the chunked logprob math go
  through torch.compile with dynamic shapes (fuses norms, rotary, activations, softmax; one graph for all layers,
  batch shapes and adapters of a rank). Small calls without autograd (a forward of a few tokens) replay a CUDA
  graph of the whole decoder instead (decoder_graphs.py): the compiled layers' host time dominates them.
- Deterministic mode (default on CPU, where it costs nothing): the same event log gives bit-identical weights on
  the same hardware and torch thread count. On GPU it is opt-in (deterministic=True): deterministic cuBLAS
  workspaces and torch.use_deterministic_algorithms, which slows some kernels.
- Requests longer than `micro_batch_tokens` run in two passes: logprobs without graph for the whole request, the
  loss and its gradient w.r.t. those logprobs, then one forward+backward per micro-batch fed that gradient. This
  is exactly the gradient of the loss over the whole request, with activations for one micro-batch at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from bus_events import payloads as p
from bus_runtime.base_models import BaseModelInfo, info_from_config
from trainer_consumer.backends import optimizers
from trainer_consumer.backends.adapters import AdapterRegistry, check_adapter_weights
from trainer_consumer.backends.base import AdapterExport, AdapterSpec, ForwardBackwardOutput
from trainer_consumer.backends.batch import MicroBatch, run_forward_backward
from trainer_consumer.backends.decoder_graphs import DecoderGraphs
from trainer_consumer.backends.host_copy import reserve_host, to_host
from trainer_consumer.backends.init import seeded_init
from trainer_consumer.backends.logprobs import frozen_unembed_logprobs, logprob_and_direction, target_logprobs
from trainer_consumer.backends.lora_compute import FusedLoraLinear, adopt, frozen_weight, use
from trainer_consumer.backends.optimizers import AnyOptimizer, make_optimizer
from trainer_consumer.backends.peft_config import adapter_config, lora_config

log = logging.getLogger(__name__)

# from_pretrained initialises on the meta device through process-global state, so concurrent loads in two
# threads break each other ("Cannot copy out of meta tensor").
_LOAD_LOCK = threading.Lock()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _Base:
    info: BaseModelInfo
    model: Any  # the transformers CausalLM; PEFT injects LoRA layers into it in place
    peft: Any = None  # the PeftModel wrapping `model`, once the first adapter exists
    active: str | None = None
    lora_layers: list[FusedLoraLinear] = field(default_factory=list)


@dataclass
class _Adapter:
    spec: AdapterSpec
    slot: str  # PEFT adapter name (model ids contain ':' and '.', which PEFT names must not)
    base: _Base
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # PEFT key -> parameter
    optimizer: AnyOptimizer | None = None


def causal_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L], True where a position may attend: the plain causal mask, given to the decoder explicitly
    for graphed calls (decoder_graphs.py says why)."""
    batch, length = input_ids.shape
    mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    return mask[None, None].expand(batch, 1, length, length)


def full_attention(config: Any, length: int) -> bool:
    """Whether every layer attends to all earlier positions of a call of up to `length` tokens, so `causal_mask` is
    the whole mask (a sliding window shorter than that would need its own)."""
    window = getattr(config, "sliding_window", None)
    return window is None or not getattr(config, "use_sliding_window", True) or window >= length


class HfPeftBackend:
    def __init__(self, *, device: str = "auto", gradient_checkpointing: bool = False,
                 logprob_chunk_tokens: int = 1024, micro_batch_tokens: int = 16384, deterministic: bool | None = None,
                 torch_compile: bool | None = None):
        self.device = pick_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.deterministic = self.device.type == "cpu" if deterministic is None else deterministic
        if self.deterministic:
            torch.manual_seed(0)  # nothing here should draw from the global RNG; if something does, draw the same
        if self.deterministic and self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.gradient_checkpointing = gradient_checkpointing
        # Generated kernels and their autotuned configs can differ between processes, which would break bit-identical
        # replays: deterministic mode stays eager unless compile is asked for explicitly.
        auto_compile = self.device.type == "cuda" and not self.deterministic
        self.torch_compile = auto_compile if torch_compile is None else torch_compile
        if self.torch_compile:
            torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        self.logprob_math = torch.compile(logprob_and_direction, dynamic=True) if self.torch_compile else \
            logprob_and_direction
        # Only over compiled layers (the default on CUDA): eager layers have no guards to recompile, but graphs of
        # them would be a second code path to keep exact.
        self.graphs = DecoderGraphs() if self.torch_compile and self.device.type == "cuda" else None
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.micro_batch_tokens = micro_batch_tokens
        self._models: AdapterRegistry[_Base, _Adapter] = AdapterRegistry(self._load_base)
        self._slots = 0

    # ------------------------------------------------------------------ base models
    def _load_base(self, name: str) -> _Base:
        from transformers import AutoModelForCausalLM

        from bus_runtime.base_models import resolve_base_model

        path = resolve_base_model(name)
        log.info("loading base model %s from %s on %s (%s)", name, path, self.device, self.dtype)
        with _LOAD_LOCK:  # two backends of one process (tests, in-process scale-out) must not load at once
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
            cast(torch.nn.Module, model).to(self.device)  # transformers' stub types `.to` oddly
        model.requires_grad_(False)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers only checkpoints layers in train mode; without checkpointing, eval mode keeps any dropout a
        # config might have off, which keeps training deterministic.
        model.train(self.gradient_checkpointing)
        if self.torch_compile:
            # Compiled lazily at the first forward, so the LoRA layers PEFT injects later are part of the graph.
            for layer in model.get_decoder().layers:
                layer.compile(dynamic=True)  # one graph for every batch shape
        return _Base(info=info_from_config(name, model.config.to_dict()), model=model)

    def base_model_info(self, base_model: str) -> BaseModelInfo:
        return self._models.base(base_model).info

    # ------------------------------------------------------------------ adapters
    def _adapter(self, model_id: str) -> _Adapter:
        return self._models.adapter(model_id)

    def _activate(self, adapter: _Adapter) -> None:
        if adapter.base.active != adapter.slot:
            use(adapter.base.lora_layers, adapter.slot)
            adapter.base.active = adapter.slot

    def create_adapter(self, model_id: str, spec: AdapterSpec) -> None:
        from peft import get_peft_model

        self._models.check_new(model_id)
        base = self._models.base(spec.base_model)
        slot = f"adapter_{self._slots}"
        self._slots += 1
        config = lora_config(spec)
        with warnings.catch_warnings():
            # LoRA on lm_head of a tied-embedding model: PEFT warns about merging; we never merge.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            if base.peft is None:
                base.peft = get_peft_model(base.model, config, adapter_name=slot)
            else:
                base.peft.add_adapter(slot, config)
        base.lora_layers = adopt(base.peft)
        adapter = _Adapter(spec=spec, slot=slot, base=base)
        marker = f".{slot}."
        adapter.params = {name.replace(marker, "."): param for name, param in base.peft.named_parameters()
                          if marker in name}
        for param in adapter.params.values():  # PEFT leaves only its active adapter trainable; we train any
            param.requires_grad_(True)
        seeded_init(adapter.params, spec.seed)
        adapter.optimizer = make_optimizer(spec.optimizer, adapter.params)
        reserve_host(adapter.params)
        self._models.add(model_id, adapter)
        base.active = None  # PEFT may have switched the active adapter; re-activate on the next op
        log.info("created adapter %s for %s (rank %d on %s)", slot, model_id, spec.rank, spec.target_modules)

    def remove_adapter(self, model_id: str) -> None:
        adapter = self._models.pop(model_id)
        if adapter is None:
            return
        adapter.base.peft.delete_adapter(adapter.slot)
        if self.graphs is not None:
            self.graphs.plan.forget(adapter.slot)
        use(adapter.base.lora_layers, None)  # drops the last references to the deleted weights
        adapter.base.active = None

    # ------------------------------------------------------------------ training
    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without a host wait: page-locked, copied behind the queued kernels."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _hidden(self, base: _Base, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [B, L, H] for host `input_ids` [B, L] under the active adapter."""
        decoder = base.model.get_decoder()
        ids = self._to_device(input_ids)
        graphs = self.graphs
        if graphs is not None and base.active is not None and full_attention(base.model.config, graphs.plan.max_tokens):
            def decode(device_ids: torch.Tensor) -> torch.Tensor:
                mask = causal_mask(device_ids)
                return decoder(input_ids=device_ids, attention_mask=mask, use_cache=False).last_hidden_state

            weights = [t for layer in base.lora_layers if layer.tb_lora is not None for t in layer.tb_lora[:2]]
            hidden = graphs.run(base.active, ids, weights, decode)
            if hidden is not None:
                return hidden
        return decoder(input_ids=ids, use_cache=False).last_hidden_state

    def _logprobs(self, base: _Base, batch: MicroBatch) -> torch.Tensor:
        """float32 [real positions of the batch, row-major] (or [positions, K]): log p(target) under the active
        adapter."""
        hidden = self._hidden(base, batch.input_ids)
        # The real positions are found on the host: a boolean mask on the device would make the host wait for
        # the whole decoder before it could queue the unembedding, the loss and the backward.
        positions = batch.mask.flatten().nonzero().squeeze(1)
        hidden = hidden.flatten(0, 1).index_select(0, self._to_device(positions))
        targets = self._to_device(batch.targets.flatten(0, 1)[positions])
        unembed = base.model.get_output_embeddings()
        weight = frozen_weight(unembed)
        # The frozen path's saved direction is the gradient of ONE target's logprob; K targets take the general path.
        if weight is not None and targets.dim() == 1:
            return frozen_unembed_logprobs(weight, hidden, targets, self.logprob_chunk_tokens, self.logprob_math)
        return target_logprobs(unembed, hidden, targets, self.logprob_chunk_tokens)

    def forward_backward(self, model_id: str, data: Sequence[p.Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float | str], forward_only: bool) -> ForwardBackwardOutput:
        adapter = self._adapter(model_id)
        base = adapter.base
        self._activate(adapter)
        return run_forward_backward(data, loss_fn, loss_fn_config, forward_only, vocab_size=base.info.vocab_size,
                                    max_positions=base.info.max_positions, micro_batch_tokens=self.micro_batch_tokens,
                                    logprobs_of=lambda batch: self._logprobs(base, batch))

    def optim_step(self, model_id: str, params: p.AdamParams | p.DimuonParams) -> dict[str, float]:
        adapter = self._adapter(model_id)
        assert adapter.optimizer is not None
        return optimizers.step(adapter.optimizer, params)

    def discard_gradients(self, model_id: str) -> None:
        adapter = self._adapter(model_id)
        assert adapter.optimizer is not None
        adapter.optimizer.zero_grad()

    # ------------------------------------------------------------------ state in and out
    def export_adapter(self, model_id: str) -> AdapterExport:
        adapter = self._adapter(model_id)
        weights = to_host(adapter.params)
        config = adapter_config(adapter.base.peft.peft_config[adapter.slot].to_dict(), adapter.spec)
        return AdapterExport(config=config, weights=weights)

    def export_optimizer(self, model_id: str) -> dict[str, torch.Tensor]:
        adapter = self._adapter(model_id)
        assert adapter.optimizer is not None
        return adapter.optimizer.export_state()

    def load_adapter(self, model_id: str, weights: Mapping[str, torch.Tensor],
                     optimizer_state: Mapping[str, torch.Tensor] | None) -> None:
        adapter = self._adapter(model_id)
        check_adapter_weights({key: list(param.shape) for key, param in adapter.params.items()}, weights)
        assert adapter.optimizer is not None
        adapter.optimizer.import_state(optimizer_state)  # validates before any weight changes
        with torch.no_grad():
            for key, param in adapter.params.items():
                param.copy_(weights[key].to(param.device, param.dtype))
        adapter.optimizer.zero_grad()

    def close(self) -> None:
        """Nothing to release: everything lives in this process's memory, freed with the backend object (which
        callers such as tests may keep using after the engine stops)."""
