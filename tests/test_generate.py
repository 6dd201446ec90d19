"""The shared decode loop (kvbench/generate.py).

A stub model checks the loop's bookkeeping exactly (padding, positions, per-row stopping, order,
the fp16 reference cache); the real SmolLM2 checks that batched greedy decoding with left padding
gives each prompt the tokens it gets alone, for fp16 and every method.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvbench.generate import (
    Generation,
    agreement_metrics,
    batches_by_length,
    fp16_reference,
    greedy_generate,
)
from kvbench.method import KVGeometry
from kvbench.registry import methods
from kvbench.session import left_padded_positions
from kvbench.task import TaskContext

# ------------------------------------------------------------------------------------------------
# A stub model: the next token is (last real token + 1) mod V, so every row's continuation is known
# ------------------------------------------------------------------------------------------------

V = 50
EOS = 0


class StubTokenizer:
    eos_token_id = EOS
    pad_token_id = 49
    unk_token_id = None
    all_special_tokens: list[str] = []
    added_tokens_encoder: dict[str, int] = {}

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if (skip_special_tokens and i == EOS) else f"<{i}>" if i >= 40 else chr(ord("a") + i % 26)
                       for i in ids)


class StubLM:
    """forward(session, ids [B, T], positions [B, T], logits_to_keep) -> one-hot of last token + 1."""

    def __init__(self):
        self.tokenizer = StubTokenizer()
        self.model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=EOS))
        self.geometry = KVGeometry(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4, hidden_size=4, rope_theta=1e4)
        self.source, self.dtype, self.device = "stub", torch.float32, torch.device("cpu")
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, session, input_ids, positions, logits_to_keep=0):
        self.calls.append((input_ids.clone(), positions.clone()))
        nxt = (input_ids[:, -1:] + 1) % V
        return torch.nn.functional.one_hot(nxt, V).float()


FP16 = methods.get("fp16")()


def test_batches_longest_first_ties_in_order():
    prompts = [[1] * 3, [1] * 5, [1] * 3, [1] * 1, [1] * 5]
    assert batches_by_length(prompts, 2) == [[1, 4], [0, 2], [3]]


def test_left_padding_positions_and_decode_positions():
    lm = StubLM()
    prompts = [[5, 6], [1, 2, 3, 4]]
    gens = greedy_generate(lm, FP16, prompts, max_new_tokens=3, batch_size=2)
    ids, pos = lm.calls[0]
    # Longest prompt first in the batch; the other is left padded with the pad id.
    assert ids.tolist() == [[1, 2, 3, 4], [49, 49, 5, 6]]
    assert pos.tolist() == [[0, 1, 2, 3], [-1, -1, 0, 1]]
    assert torch.equal(pos, left_padded_positions(torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])))
    # Decode steps: one token per row at each row's own next position.
    assert [p.tolist() for _, p in lm.calls[1:]] == [[[4], [2]], [[5], [3]]]
    assert [g.tokens for g in gens] == [[7, 8, 9], [5, 6, 7]]
    assert [g.stop_reason for g in gens] == ["length", "length"]
    assert [g.prompt_len for g in gens] == [2, 4]


def test_per_row_eos_and_stopped_rows_feed_pad():
    lm = StubLM()
    # Row 0 reaches token 0 (EOS) after 48 -> 49 -> 0; row 1 keeps going.
    gens = greedy_generate(lm, FP16, [[47], [10]], max_new_tokens=5, batch_size=2)
    assert gens[0].tokens == [48, 49, 0] and gens[0].stop_reason == "eos"
    assert gens[1].tokens == [11, 12, 13, 14, 15] and gens[1].stop_reason == "length"
    fed = [ids[:, 0].tolist() for ids, _ in lm.calls[1:]]
    assert fed == [[48, 11], [49, 12], [49, 13], [49, 14]]  # pad (49) once row 0 stopped
    assert lm.calls[-1][1].tolist() == [[4], [4]]  # the stopped row still advances its position
    assert gens[0].text == "<48><49>"  # EOS not in the text


def test_stop_string_per_row_cuts_text_and_ends_batch_early():
    lm = StubLM()
    # 'c' is token 2: row 0 (from 0) writes b, c; row 1 (from 20) writes u, v, w, x, y, z.
    gens = greedy_generate(lm, FP16, [[0], [20]], max_new_tokens=20, stop=["c", "wx"], batch_size=2)
    assert gens[0].tokens == [1, 2] and gens[0].text == "b" and gens[0].stop_reason == "stop"
    assert gens[1].tokens == [21, 22, 23] and gens[1].text == "v" and gens[1].stop_reason == "stop"
    assert len(lm.calls) == 3  # prefill + 2 decode steps: stops when every row has stopped


def test_results_in_input_order_any_batch_size():
    prompts = [[3], [1, 2, 3, 4, 5], [7, 8], [9, 9, 9]]
    one = [g.tokens for g in greedy_generate(StubLM(), FP16, prompts, 4, batch_size=1)]
    many = [g.tokens for g in greedy_generate(StubLM(), FP16, prompts, 4, batch_size=3)]
    assert one == many == [[4, 5, 6, 7], [6, 7, 8, 9], [9, 10, 11, 12], [10, 11, 12, 13]]


def test_bad_arguments():
    with pytest.raises(ValueError):
        greedy_generate(StubLM(), FP16, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError):
        greedy_generate(StubLM(), FP16, [[]], max_new_tokens=1)


def test_agreement_metrics_hand_computed():
    gens = [Generation([1, 2, 3], "", "length", 1), Generation([1, 9, 3], "", "length", 1)]
    m = agreement_metrics(gens, [[1, 2, 3], [1, 2, 3]])
    assert m == {"fp16_agreement": 0.5, "first_divergence": 2.0}  # (3 + 1) / 2
    assert agreement_metrics(gens, None) == {}


def test_fp16_reference_computed_once_and_cached(tmp_path: Path):
    lm = StubLM()
    rtn = methods.get("rtn")(bits=4, group_size=4)
    ctx = TaskContext(lm=lm, method=rtn, method_label="rtn", seed=0, cache_dir=tmp_path, reference_method=FP16)
    ref = fp16_reference(ctx, [[1], [2, 3]], max_new_tokens=2, tag="t")
    assert ref == [[2, 3], [4, 5]]
    n_calls = len(lm.calls)
    assert fp16_reference(ctx, [[1], [2, 3]], max_new_tokens=2, tag="t") == ref
    assert len(lm.calls) == n_calls  # read from disk
    files = list((tmp_path / "fp16_generations").glob("t-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["tokens"] == ref
    # Other settings or prompts: another entry.
    fp16_reference(ctx, [[1], [2, 3]], max_new_tokens=3, tag="t")
    assert len(list((tmp_path / "fp16_generations").glob("t-*.json"))) == 2
    # The fp16 method's own generations are the reference; no extra decoding.
    ctx_fp = dataclasses.replace(ctx, method=FP16)
    own = [Generation([7], "", "length", 1)]
    assert fp16_reference(ctx_fp, [[9]], max_new_tokens=1, own=own, tag="u") == [[7]]
    # No reference method: no agreement.
    assert fp16_reference(dataclasses.replace(ctx, reference_method=None), [[8]], max_new_tokens=1, tag="v") is None


# ------------------------------------------------------------------------------------------------
# Real model: batched (left padded) equals unbatched, for fp16 and every method
# ------------------------------------------------------------------------------------------------

# Small KIVI groups and window so that quantized key groups appear within 40-100 token prompts.
METHOD_CASES = {
    "fp16": ("fp16", {}),
    "rtn-4": ("rtn", {"bits": 4, "group_size": 64}),
    "kivi-2": ("kivi", {"bits": 2, "group_size": 16, "residual": 32}),
    "quarot-2": ("quarot", {"bits": 2, "group_size": 64}),
    "rotatekv-2": ("rotatekv", {"bits": 2, "reorder": False}),  # sinks on: per-row detection
}
LENGTHS = (40, 70, 100)
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def essay_ids(smollm2):
    from kvbench.data import essays_dir

    text = sorted(essays_dir().glob("*.txt"))[0].read_text(encoding="utf-8")
    ids = smollm2.tokenizer(text).input_ids
    # Three different passages, so rows differ in content as well as length.
    return [ids[i * 150 : i * 150 + n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def smollm2_f64(smollm2):
    """A float64 copy of SmolLM2: rounding differences between batch shapes (~1e-7 in float32)
    fall far below any quantization step, so batched and unbatched runs quantize the same values."""
    import copy

    return dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model).double(), dtype=torch.float64)


def _batched_vs_alone(lm, method, prompts):
    batched = greedy_generate(lm, method, prompts, NEW_TOKENS, batch_size=len(prompts))
    alone = [greedy_generate(lm, method, [p], NEW_TOKENS, batch_size=1)[0] for p in prompts]
    return [g.tokens for g in batched], [g.tokens for g in alone]


def test_batched_equals_unbatched_fp16_float32(smollm2, essay_ids):
    batched, alone = _batched_vs_alone(smollm2, FP16, essay_ids)
    assert batched == alone


# kivi-2 (the most position-dependent cache) stays in the fast suite; the others take ~20 s each
# on a loaded 2-core machine and run with -m slow.
FAST = {"kivi-2"}


@pytest.mark.parametrize(
    "label", [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in METHOD_CASES]
)
def test_batched_equals_unbatched(smollm2_f64, essay_ids, label):
    name, params = METHOD_CASES[label]
    method = methods.get(name)(**params)
    batched, alone = _batched_vs_alone(smollm2_f64, method, essay_ids)
    assert batched == alone, f"{label}: batched {batched} != alone {alone}"
