"""Chat conversations of a JSON forward_backward -> bus datums: each conversation tokenized with the base
model's chat template, loss weight 1 on its assistant tokens, and the caller's loss_fn_inputs lined up with it."""

from __future__ import annotations

from typing import Any

import numpy as np

from bus_events import payloads as p
from bus_events import tensor_from_numpy, token_ids_tensor
from bus_gateway.chat_data import tokenize_conversation
from bus_gateway.errors import FieldError
from bus_gateway.json_api.schemas import JsonForwardBackward


def per_token_values(value: list[float] | float, mask: np.ndarray, default: np.ndarray, field: str) -> np.ndarray:
    """Per-token values of one input: a number is spread over the assistant tokens; a list lines up with the end
    of model_input (the original server's examples give values for the final answer only) and must reach back
    to the first assistant token. Positions before a short list keep `default`."""
    if not isinstance(value, list):
        return mask.astype(np.float64) * value
    size, given = mask.size, len(value)
    trained = np.flatnonzero(mask)
    reach = size - int(trained[0]) if trained.size else size
    if given == size:
        return np.asarray(value, dtype=np.float64)
    if reach <= given < size:
        out = default.astype(np.float64)
        out[size - given:] = value
        return out
    raise FieldError(field, f"has {given} values, but the conversation's model_input has {size} tokens (its "
                            f"token count minus one): give {size} values, or at least the last {reach}, which "
                            "reach back to its first assistant token (a shorter list lines up with the end)")


def conversation_datums(tokenizer: Any, data: JsonForwardBackward) -> list[p.Datum]:
    """One datum per conversation: model_input = its tokens but the last, target_tokens = its tokens but the
    first, weights = 1 where the target is an assistant token; loss_fn_inputs may override or add inputs."""
    datums = []
    inputs = data.loss_fn_inputs or {}
    for name, per_conversation in inputs.items():
        if len(per_conversation) != len(data.data):
            raise FieldError(f"loss_fn_inputs.{name}", f"has {len(per_conversation)} entries for "
                                                      f"{len(data.data)} conversations")
    for i, conversation in enumerate(data.data):
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        ids, assistant = tokenize_conversation(tokenizer, messages, f"data[{i}]")
        mask = assistant[1:]  # position t predicts token t+1: weight the predictions of assistant tokens
        fields = {"target_tokens": ids[1:].astype(np.float64), "weights": mask.astype(np.float64)}
        for name, per_conversation in inputs.items():
            default = fields.get(name, np.zeros(mask.size))
            fields[name] = per_token_values(per_conversation[i], mask, default, f"loss_fn_inputs.{name}[{i}]")
        target = fields.pop("target_tokens")
        if np.any(target != np.round(target)):
            raise FieldError(f"loss_fn_inputs.target_tokens[{i}]", "token ids must be integers")
        wire = {"target_tokens": token_ids_tensor(target.astype(np.int64))}
        wire |= {name: tensor_from_numpy(values, "float32") for name, values in fields.items()}
        datums.append(p.Datum(tokens=tensor_from_numpy(ids[:-1], "int32"), loss_fn_inputs=wire))
    return datums
