"""Id formats every part relies on: a model is `<session>:train:<n>`, a sampling session `<session>:sample:<n>`
(docs/events.md, "ids, seq_id and ordering"). The model id is also the Kafka record key."""

from __future__ import annotations

import re

TRAIN_INFIX = ":train:"
SAMPLE_INFIX = ":sample:"
MODEL_ID_RE = re.compile(r"^.+:train:\d+$")


def model_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}{TRAIN_INFIX}{model_seq_id}"


def sampling_session_id_for(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}{SAMPLE_INFIX}{sampling_session_seq_id}"


def session_of_model(model_id: str) -> str:
    return model_id.rsplit(TRAIN_INFIX, 1)[0]


def is_model_id(value: str) -> bool:
    """True for ids of the `<session>:train:<n>` form (as opposed to, e.g., a JSON-API adapter name)."""
    return MODEL_ID_RE.match(value) is not None
