"""Shared fixtures: the real SmolLM2 model, loaded once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32, CPU). The first load converts the GGUF (~30 s) and caches it."""
    from kvbench.model import load_model

    return load_model("smollm2-135m", "smollm2", device="cpu", dtype="float32")
