"""Per-example predictions of a run, kept compact in its record so that arms can be compared paired.

    eval loader (dataset order) -> module._eval_step collects (pred, label) per loader
        -> on epoch end: one tensor per loader (DDP: gathered, sampler padding dropped)
        -> encode(): {"format": "digits", "pred": "0110...", "label": "0100...", "n": 408}
                     {"format": "floats", "pred": "3.2 0.75 ...", ...}   (regression, 7 digits)

Strings instead of JSON lists: a result file stays a few kB and readable (an indented list of
1,500 numbers is 1,500 lines). ``decode`` gives numpy arrays back (msplora.ablation.stats reads them).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["decode", "encode", "gather_in_order"]


def encode(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, regression: bool) -> dict:
    """Predicted classes (or values) and the gold labels, in dataset order."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    if len(pred) != len(label):
        raise ValueError(f"{len(pred)} predictions for {len(label)} labels")
    if regression:
        fmt, write = "floats", lambda a: " ".join(f"{float(x):.7g}" for x in a)
    elif len(pred) == 0 or max(pred.max(), label.max()) < 10 and min(pred.min(), label.min()) >= 0:
        fmt, write = "digits", lambda a: "".join(str(int(x)) for x in a)
    else:
        fmt, write = "ints", lambda a: " ".join(str(int(x)) for x in a)
    return {"format": fmt, "n": len(pred), "pred": write(pred), "label": write(label)}


def decode(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(pred, label) arrays of an ``encode`` record: int64 for classes, float64 for regression."""
    fmt = record.get("format")
    if fmt == "digits":
        read = lambda s: np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("0")  # noqa: E731
    elif fmt == "ints":
        read = lambda s: np.array(s.split(), dtype=np.int64)  # noqa: E731
    elif fmt == "floats":
        read = lambda s: np.array(s.split(), dtype=np.float64)  # noqa: E731
    else:
        raise ValueError(f"unknown predictions format {fmt!r}")
    pred, label = read(record["pred"]), read(record["label"])
    if len(pred) != record["n"] or len(label) != record["n"]:
        raise ValueError(f"predictions record says n={record['n']} but holds {len(pred)} / {len(label)}")
    return pred, label


def gather_in_order(module, local: torch.Tensor, n: int) -> torch.Tensor:
    """The whole loader's values in dataset order. Single process: ``local`` itself. DDP: Lightning's
    eval sampler (``DistributedSampler(shuffle=False)``) gives rank r the rows r, r+W, r+2W, ... of the
    dataset padded to a multiple of W, so gathering (W, k) and reading it column by column restores
    the order; the padding (repeats of the first rows) is cut at ``n``."""
    world = module.trainer.world_size if module._trainer is not None else 1
    if world == 1:
        return local
    gathered = module.all_gather(local)  # (W, k)
    return gathered.transpose(0, 1).reshape(-1)[:n]
