"""Calibration: one clean full-precision pass over held-out text, cached on disk.

Methods that need it (`needs_calibration`) see every layer's new tokens through `observe`; what
they learn is saved under the cache dir keyed by model, method, calibration parameters and data,
so it is computed once. Calibration text never comes from the evaluation windows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kvbench import data
from kvbench.errors import UserError
from kvbench.method import KVMethod
from kvbench.model import LoadedModel, cache_dir
from kvbench.session import KVSession

CALIBRATION_SOURCES = ("pg-essays", "gsm8k-train")


def calibration_text(source: str) -> tuple[str, str]:
    """(text, where it came from) for a calibration source name."""
    if source == "pg-essays":
        essays = sorted(data.essays_dir().glob("*.txt"))
        return "\n\n".join(p.read_text(encoding="utf-8") for p in essays), "pg-essays"
    if source == "gsm8k-train":
        rows, where = data.gsm8k_rows("train")
        return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows), f"gsm8k train ({where})"
    raise UserError(f"calibration source {source!r} is not one of {', '.join(CALIBRATION_SOURCES)}")


def calibration_windows(lm: LoadedModel, source: str, samples: int, seq_len: int) -> torch.Tensor:
    text, _ = calibration_text(source)
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < samples * seq_len:
        raise UserError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than {samples} x {seq_len}")
    return ids[: samples * seq_len].view(samples, seq_len)


def calibrate(lm: LoadedModel, method: KVMethod, on_window=None) -> dict:
    """Load or compute the method's calibration; returns a description for the results."""
    params = method.calibration_params()
    text, where = calibration_text(params["source"])
    key_src = json.dumps(
        {
            "model": lm.source,
            "dtype": str(lm.dtype),
            "method": method.name,
            "params": params,
            "data": hashlib.sha256(text.encode()).hexdigest(),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir() / "calibration" / f"{method.name}-{key}.pt"
    info = {"source": where, "samples": params["samples"], "seq_len": params["seq_len"], "cache": str(path), "key": key}
    if path.is_file():
        method.load_calibration_state(torch.load(path, weights_only=True))
        return {**info, "cached": True}

    from kvbench.registry import methods

    windows = calibration_windows(lm, params["source"], params["samples"], params["seq_len"])
    reference = methods.get("fp16")()
    positions = torch.arange(windows.shape[1])[None]
    for window in windows:
        session = KVSession(reference, lm.geometry, observer=method.observe)
        lm.forward(session, window[None], positions, logits_to_keep=1)
        if on_window is not None:
            on_window()
    state = method.calibration_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    method.load_calibration_state(state)
    return {**info, "cached": False}
