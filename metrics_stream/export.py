"""A model's curves as files: TensorBoard event files (tensorboardX's writer) or JSONL that W&B imports.

JSONL: one row per x (seq_id for training series), `{"_step": x, "_timestamp": t, "<series>": value, ...}`: the
shape `wandb.log(row, step=row["_step"])` takes, so `for row in rows: run.log(...)` replays a run into W&B.
TensorBoard: one scalar per point, tag = series name (see tensorboard_tag), step = x, wall time = the event's time.
"""

from __future__ import annotations

import json
from pathlib import Path

from metrics_stream.series import ModelCurves

FORMATS = ("tensorboard", "jsonl")


def jsonl_rows(curves: ModelCurves) -> list[dict]:
    rows: dict[float, dict] = {}
    for name, points in curves.series.items():
        for x, t, value in points:
            row = rows.setdefault(x, {"_step": int(x), "_timestamp": t})
            row["_timestamp"] = max(row["_timestamp"], t)
            row[name] = value
    return [rows[x] for x in sorted(rows)]


def write_jsonl(curves: ModelCurves, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.jsonl"
    with open(path, "w") as fh:
        for row in jsonl_rows(curves):
            fh.write(json.dumps(row) + "\n")
    return path


def write_tensorboard(curves: ModelCurves, out: Path) -> Path:
    from tensorboardX import SummaryWriter  # only this command needs it

    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(logdir=str(out), comment="", flush_secs=1)
    try:
        for name, points in sorted(curves.series.items()):
            for x, t, value in points:
                writer.add_scalar(tensorboard_tag(name), value, global_step=int(x), walltime=t)
    finally:
        writer.close()
    return out


def tensorboard_tag(name: str) -> str:
    """TensorBoard tags allow [-/\\w.]: "loss:sum" becomes "loss/sum" (grouped under "loss" in its UI)."""
    return name.replace(":", "/")


def write_curves(curves: ModelCurves, fmt: str, out: Path) -> Path:
    if fmt == "jsonl":
        return write_jsonl(curves, out)
    if fmt == "tensorboard":
        return write_tensorboard(curves, out)
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
