"""The real SmolLM2 on small windows: the integration is exact and the methods order as they must."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvbench.registry import methods
from kvbench.session import KVSession
from kvbench.windows import wikitext_windows, window_logits

SEQ_LEN, WINDOWS = 256, 2


def _ppl(lm, method, windows):
    nll, n = 0.0, 0
    for w in windows:
        logits = window_logits(lm, method, w)
        nll += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
        n += w.numel() - 1
    return math.exp(nll / n)


@pytest.fixture(scope="module")
def windows(smollm2):
    return wikitext_windows(smollm2, SEQ_LEN, WINDOWS)[0]


@pytest.fixture(scope="module")
def ppl(smollm2, windows):
    specs = {
        "fp16": ("fp16", {}),
        "rtn-8": ("rtn", {"bits": 8}),
        "rtn-4": ("rtn", {"bits": 4}),
        "rtn-2": ("rtn", {"bits": 2}),
        # a short window and groups so that quantization starts within 256 tokens
        "kivi-2": ("kivi", {"bits": 2, "group_size": 32, "residual": 32}),
        "quarot-2": ("quarot", {"bits": 2}),
    }
    return {label: _ppl(smollm2, methods.get(name)(**p), windows) for label, (name, p) in specs.items()}


def test_our_attention_path_equals_transformers(smollm2, windows):
    with torch.inference_mode():
        native = smollm2.model(windows[:1]).logits[0]
    ours = window_logits(smollm2, methods.get("fp16")(), windows[0])
    assert torch.allclose(ours, native, atol=1e-4, rtol=1e-4)


def test_attention_is_restored_after_a_session(smollm2, windows):
    session = KVSession(methods.get("rtn")(bits=2), smollm2.geometry)
    smollm2.forward(session, windows[:1], torch.arange(SEQ_LEN)[None])
    assert "forward" not in vars(smollm2.model.model.layers[0].self_attn)


def test_fp16_perplexity_is_plausible(ppl):
    assert 15 < ppl["fp16"] < 40


def test_orderings(ppl):
    assert abs(ppl["rtn-8"] / ppl["fp16"] - 1) < 0.005
    assert ppl["rtn-4"] > ppl["rtn-8"]
    assert ppl["rtn-2"] > 5 * ppl["fp16"]  # naive 2-bit breaks this model
    assert ppl["kivi-2"] < ppl["rtn-2"] / 4
    assert ppl["quarot-2"] < ppl["rtn-2"] / 2


def test_rotatekv_2_beats_quarot_2(smollm2, windows, ppl):
    rotatekv = methods.get("rotatekv")(bits=2, reorder=False)
    assert _ppl(smollm2, rotatekv, windows) < ppl["quarot-2"]
