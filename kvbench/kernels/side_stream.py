"""A second CUDA stream for independent launches inside a decode step.

A decode step is a chain of launches, many of them a few microseconds of a handful of programs
(the full-precision tokens' partial, RotateKV's value write). Work issued on the side stream
between `fork` and `join` starts after everything issued so far on the current stream and ends
before anything the current stream issues after `join`; in a captured CUDA graph it becomes a
parallel branch, so those small kernels run beside the packed read's passes or the key write
instead of after them.

No `record_stream` is needed for tensors made on the side stream and read on the current one
after `join`: the allocator keeps a freed block for the stream that allocated it, and the side
stream's next use begins with `fork`, i.e. after the current stream's reads. `KVBENCH_SIDE_STREAM=0`
keeps everything on one stream (for A/B runs).
"""

from __future__ import annotations

import contextlib
import os

import torch

_STREAMS: dict = {}


def enabled(device) -> bool:
    return torch.device(device).type == "cuda" and os.environ.get("KVBENCH_SIDE_STREAM", "1") != "0"


def fork(device) -> torch.cuda.Stream | None:
    """The device's side stream, made to wait for the current stream's work so far (None where
    side streams are off or the device is not CUDA)."""
    if not enabled(device):
        return None
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device=key)
    side = _STREAMS[key]
    side.wait_stream(torch.cuda.current_stream(key))
    return side


def on(side: torch.cuda.Stream | None):
    """Context running its launches on `side` (a no-op context for None)."""
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


def join(side: torch.cuda.Stream | None) -> None:
    """The current stream waits for what was issued on `side`."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)
