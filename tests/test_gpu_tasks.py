"""CPU-side tests of the GPU tasks: refusal without CUDA, speed models, the max-batch search,
timing statistics and the decode engine's caches (the GPU numbers come from scripts/gpu_suite.sh)."""

from __future__ import annotations

import statistics

import pytest
import torch

from kvbench.cli import main
from kvbench.errors import UserError

GPU_TASKS = [
    ("peak_memory", "{batch: 2, context: 64}"),
    ("max_batch", "{prompt_len: 64, decode_steps: 8}"),
    ("decode_latency", "{batch: 2, context: 64}"),
]

CONFIG = """\
output: {out}
device: cpu
models:
  - {{name: tiny, path: "random:tiny"}}
methods:
  - {{name: fp16, params: {{mode: packed}}}}
tasks:
  - {{name: {task}, params: {params}}}
"""


@pytest.mark.parametrize("task,params", GPU_TASKS)
def test_gpu_task_refused_on_cpu_config(task, params, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", task=task, params=params))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tasks[0]" in err and "needs device: cuda" in err


@pytest.mark.parametrize("task,params", GPU_TASKS)
def test_gpu_task_run_refuses_without_cuda(task, params, monkeypatch):
    import yaml

    from kvbench.registry import tasks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = tasks.get(task)(**yaml.safe_load(params))
    assert t.requires_cuda
    with pytest.raises(UserError, match="needs CUDA"):
        t.run(ctx=None)


def test_unknown_random_config_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", task="perplexity", params="{seq_len: 8}")
                   .replace("random:tiny", "random:llama-9"))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "random:llama-9" in err and "random:llama-2-7b" in err and len(err.splitlines()) == 1


# -- speed models ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,layers,heads,kv_heads,head_dim,hidden,theta,params_b",
    [("llama-2-7b", 32, 32, 32, 128, 4096, 1e4, 6.74), ("llama-3-8b", 32, 32, 8, 128, 4096, 5e5, 8.03)],
)
def test_speed_model_configs(name, layers, heads, kv_heads, head_dim, hidden, theta, params_b):
    from kvbench.model import geometry_of
    from kvbench.speed_models import build_config, describe

    g = geometry_of(build_config("random:" + name))
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.hidden_size) == (
        layers, heads, kv_heads, head_dim, hidden)
    assert g.rope_theta == theta
    d = describe("random:" + name)
    assert d.params / 1e9 == pytest.approx(params_b, abs=0.01)
    assert d.kv_bytes_per_token == 2 * 2 * layers * kv_heads * head_dim


def test_tiny_random_model_builds_on_cpu():
    from kvbench.model import load_model
    from kvbench.speed_models import describe, weight_bytes

    lm = load_model("tiny", "random:tiny", "cpu", "float16")
    g = lm.geometry
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (2, 4, 2, 16)
    assert next(lm.model.parameters()).dtype == torch.float16
    assert weight_bytes(lm.model) == describe("random:tiny").weight_bytes
    ids = lm.tokenizer("hello", return_tensors="pt").input_ids
    assert ids.shape == (1, 5) and int(ids.max()) < 256


# -- max batch search --------------------------------------------------------------------------


@pytest.mark.parametrize("true_max", [0, 1, 2, 3, 5, 30, 31, 32, 33, 206, 255, 256, 1000])
def test_search_max_finds_the_largest_fitting_batch(true_max):
    from kvbench.tasks.max_batch import search_max

    calls = []

    def fits(b):  # a fake OOM predicate
        calls.append(b)
        return b <= true_max

    best, trials = search_max(fits, start=1, limit=512)
    assert best == min(true_max, 512)
    assert [b for b, _ in trials] == calls
    assert all(ok == (b <= true_max) for b, ok in trials)
    assert len(trials) <= 2 * 10 + 1  # doubling plus bisection: logarithmic


def test_search_max_stops_at_limit():
    from kvbench.tasks.max_batch import search_max

    best, trials = search_max(lambda b: True, start=1, limit=100)
    assert best == 100 and trials[-1] == (100, True)


def test_lower_until_fits_steps_down_past_out_of_memory_only():
    from kvbench.tasks.max_batch import lower_until_fits

    def attempt(b):
        if b > 150:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return f"ran at {b}"

    b, result = lower_until_fits(206, attempt)
    assert 146 <= b <= 150 and result == f"ran at {b}"  # 2% steps: the first batch at or below 150
    assert lower_until_fits(5, lambda b: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))) is None
    with pytest.raises(ValueError):
        lower_until_fits(206, lambda b: (_ for _ in ()).throw(ValueError("not a memory error")))


class _FakeEngine:
    """DecodeEngine's surface for the throughput step: capture fails above `capture_max` rows with
    the given error (the error text the GPU gave in the fifteenth session's runs)."""

    capture_max, error = 0, ""
    built: list[int] = []

    def __init__(self, lm, method, batch, capacity, seed=0):
        self.batch, self.graph_error = batch, None
        _FakeEngine.built.append(batch)

    def fill(self, n, how):
        pass

    def fix_length(self, n):
        pass

    def capture(self, advance):  # DecodeEngine.capture's contract: out of memory raises
        if self.batch > self.capture_max:
            if "out of memory" in self.error.lower():
                raise torch.OutOfMemoryError(self.error)
            self.graph_error = self.error
            return False
        return True

    def step(self, advance=True):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("error,captured", [
    ("capture failed: AcceleratorError: CUDA error: out of memory", True),
    ("capture failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 110.00 MiB.", True),
    ("caches are not marked graph_safe: decode steps run uncaptured", False),
])
def test_throughput_is_captured_at_the_largest_batch_whose_graph_fits(error, captured, monkeypatch):
    # A capture that runs out of memory lowers the batch like any other out-of-memory error: timing
    # that batch uncaptured would set launch-bound steps against fp16's captured ones. Only a capture
    # that fails for another reason is timed uncaptured, flagged and noted.
    import types

    import kvbench.decode as decode
    import kvbench.gpu_timing as gt
    from kvbench.registry import tasks

    _FakeEngine.capture_max, _FakeEngine.error, _FakeEngine.built = 200, error, []
    monkeypatch.setattr(decode, "DecodeEngine", _FakeEngine)
    monkeypatch.setattr(decode, "free_cuda", lambda: None)
    monkeypatch.setattr(gt, "time_each", lambda fn, reps, warmup: gt.summarize([50.0] * reps))
    task = tasks.get("max_batch")(prompt_len=64, decode_steps=8)
    notes: list[str] = []
    m = task._throughput(types.SimpleNamespace(lm=None, method=None, seed=0), 206, notes)
    if captured:
        assert m["throughput_graph"] == 1.0 and 196 <= m["throughput_batch"] <= 200
        assert _FakeEngine.built[0] == 206 and any("at 206 ran out of memory" in n for n in notes)
    else:
        assert m["throughput_graph"] == 0.0 and m["throughput_batch"] == 206
        assert any("not captured" in n for n in notes)
    assert m["throughput_tok_s"] == pytest.approx(m["throughput_batch"] * 1e3 / 50.0)


# -- timing statistics -------------------------------------------------------------------------


def test_summarize_matches_statistics():
    from kvbench.gpu_timing import quantile, summarize

    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.0]
    s = summarize(values)
    assert s.median_ms == statistics.median(values)
    assert s.min_ms == 1.0 and s.n == 7
    assert s.mean_ms == pytest.approx(statistics.mean(values))
    assert s.p90_ms == pytest.approx(statistics.quantiles(values, n=10, method="inclusive")[-1])
    assert quantile([1.0, 2.0], 0.5) == 1.5
    with pytest.raises(ValueError):
        summarize([])


# -- decode engine on CPU ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from kvbench.speed_models import load_random_model

    return load_random_model("tiny", "random:tiny", "cpu", "float32")


def test_static_fp16_cache_matches_simulated(tiny):
    from kvbench.registry import methods
    from kvbench.session import KVSession

    ids = torch.randint(256, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    outs = []
    for mode in ("simulated", "packed"):
        s = KVSession(methods.get("fp16")(mode=mode), tiny.geometry)
        steps = [tiny.forward(s, ids[:, :16], pos[:, :16])]
        steps += [tiny.forward(s, ids[:, i : i + 1], pos[:, i : i + 1]) for i in range(16, 24)]
        outs.append(torch.cat(steps, 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_stacked_projections_are_views_and_keep_outputs():
    # fuse_projections (the speed runs' one GEMM for q/k/v and one for gate/up) on a model with
    # biases: the Linears become views of the stacked weights (no second copy), the model's own
    # forward is unchanged bit for bit, and the stacked product equals the separate ones
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbench.model import fuse_projections

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        params = sum(p.numel() for p in model.parameters())
        fuse_projections(model)
        fuse_projections(model)  # idempotent
        assert torch.equal(model(ids).logits, before)
        assert sum(p.numel() for p in model.parameters()) == params
        attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
        weight, bias, sizes = attn.kvbench_qkv
        assert sizes == [32, 16, 16] and attn.v_proj.weight.data_ptr() == weight[48:].data_ptr()
        x = torch.randn(3, 32)
        got = torch.nn.functional.linear(x, weight, bias).split(sizes, -1)
        for y, lin in zip(got, (attn.q_proj, attn.k_proj, attn.v_proj)):
            torch.testing.assert_close(y, lin(x), rtol=1e-6, atol=1e-6)
        weight, bias, sizes = mlp.kvbench_gate_up
        gate, up = torch.nn.functional.linear(x, weight, bias).split(sizes, -1)
        torch.testing.assert_close(gate, mlp.gate_proj(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(up, mlp.up_proj(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,params",
    [
        ("fp16", {"mode": "packed"}),
        ("kivi", {"mode": "packed", "bits": 2, "group_size": 16, "residual": 32}),
        ("quarot", {"mode": "packed", "bits": 2, "group_size": 16}),
        ("rtn", {"mode": "packed", "bits": 2, "group_size": 16}),
        ("rotatekv", {"mode": "packed", "bits": 2, "group_size": 16, "head_group": 2, "reorder": False}),
    ],
)
def test_engine_fills_and_steps(tiny, name, params):
    from kvbench.decode import DecodeEngine
    from kvbench.registry import methods

    e = DecodeEngine(tiny, methods.get(name)(**params), batch=3, capacity=120)
    assert e.preallocated
    e.fill(100, "random")
    assert e.fill_how == "random content written directly"
    before = e.kv_bytes()
    for _ in range(4):
        e.step(advance=True)
    assert e.length == 104 and int(e.positions[0, 0]) == 104
    assert e.kv_bytes() == before  # preallocated: decode does not grow storage
    e.fix_length(101)
    e.step(advance=False)  # fixed-length timing step: lengths are put back
    assert e.length == 104


@pytest.mark.parametrize("error,raises", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),  # the AcceleratorError text the H100 gave
    (RuntimeError("operation not permitted when stream is capturing"), False),
])
def test_engine_capture_raises_out_of_memory_and_reports_other_failures(tiny, error, raises, monkeypatch):
    import kvbench.gpu_timing as gt
    from kvbench.decode import DecodeEngine
    from kvbench.registry import methods

    e = DecodeEngine(tiny, methods.get("fp16")(mode="packed"), batch=2, capacity=40)
    e.fill(30, "random")
    before = e.positions.clone()

    def failing_capture(fn, warmup=1):
        fn()  # the warm-up step moves the positions; capture must put them back either way
        raise error

    monkeypatch.setattr(gt, "capture", failing_capture)
    if raises:
        with pytest.raises(type(error)):
            e.capture(advance=True)
    else:
        assert e.capture(advance=True) is False and "not permitted" in e.graph_error
    assert e.graph is None and torch.equal(e.positions, before)


@pytest.mark.parametrize("present", [("optimum.quanto",), ("hqq",), ()])
def test_quantized_cache_backend_is_spelled_as_transformers_takes_it(present, monkeypatch):
    # transformers' QuantizedCache accepts "quanto" and "hqq" only (5.17 refused our "HQQ").
    import importlib.util

    from kvbench.tasks import decode_latency

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in present else None)
    if not present:
        with pytest.raises(ImportError, match="neither optimum-quanto nor hqq"):
            decode_latency._quant_backend()
        return
    backend = decode_latency._quant_backend()
    assert backend == {"optimum.quanto": "quanto", "hqq": "hqq"}[present[0]]
