"""Hand-laid CUDA kernels compiled at first use by NVRTC (`torch.cuda._compile_kernel`): no build
step and no headers (the sources use inline PTX). A compiled kernel is cached per source and device;
`available()` says once whether this torch/driver can compile and load one (else callers fall back
to their Triton kernels)."""

from __future__ import annotations

import torch

_KERNELS: dict = {}
_AVAILABLE: list = []

_PROBE = r"""extern "C" __global__ void kvbench_probe(float* x) { x[threadIdx.x] += 1.f; }"""


def compile_source(source: str, name: str, device):
    key = (source, name, str(device))
    if key not in _KERNELS:
        from torch.cuda import _compile_kernel

        with torch.cuda.device(device):
            _KERNELS[key] = _compile_kernel(source, name)
    return _KERNELS[key]


def available() -> bool:
    """Whether NVRTC compiles and loads a kernel here (checked once; a failure is remembered)."""
    if not _AVAILABLE:
        try:
            compile_source(_PROBE, "kvbench_probe", torch.device("cuda", torch.cuda.current_device()))
            _AVAILABLE.append(True)
        except Exception:  # no CUDA, no NVRTC, a torch without _compile_kernel, a driver refusing the PTX
            _AVAILABLE.append(False)
    return _AVAILABLE[0]
