"""Llama-shaped models with random weights, for memory and speed runs: `random:<config>`.

Speed and memory do not depend on the weights' values, so the GPU suite builds the model from a
named config (public architecture facts) with random fp16 weights made directly on the device:
nothing travels, and a 7B model is ready in about a second. Accuracy numbers from these models
mean nothing; the harness only times and measures them.

They have no tokenizer. `ByteTokenizer` stands in (token id = UTF-8 byte), so methods that
calibrate on text (rotatekv's channel reordering) still run; what they learn from a random model
is as random as the model, which changes no timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from kvbench.errors import UserError

PREFIX = "random:"

# Public config facts (the models' config.json on the hub).
CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
        intermediate_size=11008, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
        intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    # Tests and CPU smoke runs: 2 layers, GQA 4:2, head_dim 16.
    "tiny": dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, vocab_size=256, rope_theta=10000.0, max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}


def is_random(path: str) -> bool:
    return path.startswith(PREFIX)


def config_name(path: str) -> str:
    name = path[len(PREFIX):] if is_random(path) else path
    if name not in CONFIGS:
        raise UserError(f"model {path!r}: unknown random config {name!r}; known: {', '.join(PREFIX + n for n in CONFIGS)}")
    return name


def build_config(name: str):
    from transformers import LlamaConfig

    c = dict(CONFIGS[config_name(name)])
    theta = c.pop("rope_theta")
    return LlamaConfig(
        **c,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


@dataclass
class _Encoded:
    input_ids: torch.Tensor


class ByteTokenizer:
    """Token id = UTF-8 byte value (all configs have vocab >= 256). For calibration text only."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self.pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None, **_):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % self.vocab_size
        return _Encoded(input_ids=ids[None] if return_tensors == "pt" else ids)

    def decode(self, ids, **_) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_random_model(name: str, path: str, device: str = "cpu", dtype: str = "float16", seed: int = 0):
    """A LoadedModel of config `path` (`random:llama-2-7b`) with N(0, 0.02) weights on `device`."""
    from transformers import LlamaForCausalLM

    from kvbench.model import LoadedModel, geometry_of

    config = build_config(path)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    # Built on the target device in the target dtype: no fp32 copy on the host, init runs there.
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    model.eval()
    return LoadedModel(
        name=name,
        source=path,
        model=model,
        tokenizer=ByteTokenizer(config.vocab_size),
        geometry=geometry_of(config),
        device=torch.device(device),
        dtype=torch_dtype,
    )


def describe(path: str) -> SimpleNamespace:
    """Weights and KV bytes per token of a config (fp16), without building it."""
    c = CONFIGS[config_name(path)]
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h
    params = layers * per_layer + 2 * vocab * h + h
    return SimpleNamespace(params=params, weight_bytes=2 * params, kv_bytes_per_token=2 * 2 * layers * kv)
