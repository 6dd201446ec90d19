"""The compression interface: what a KV-cache method is, and what the harness asks of it.

A method is a dataclass whose fields are its hyperparameters (validated in `__post_init__`). For
each batch the harness asks it for one `LayerCache` per layer; the model's attention then hands
every new token's keys and values to that cache (`append`) and asks it for attention (`attend`).
The cache decides what is stored (dequantized copies in simulated mode, packed codes in packed
mode) and how attention reads it, so nothing here assumes simulation.

Methods see the keys both before and after RoPE, the RoPE tables, and the residual stream
entering the layer (for attention-sink detection); they never touch transformers.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.params import check


@dataclass(frozen=True)
class KVGeometry:
    """The shapes of a model's KV cache: all a method needs to know about the model."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope_theta: float

    @property
    def kv_channels(self) -> int:
        """Channels of one token's keys (or values) in one layer, all KV heads together."""
        return self.num_kv_heads * self.head_dim


@dataclass
class NewTokens:
    """One layer's keys and values for the tokens entering the cache in one forward call.

    Shapes: B batch rows, H_kv KV heads, T new tokens, D head_dim.
    """

    k_pre: torch.Tensor  # [B, H_kv, T, D] keys before RoPE
    k: torch.Tensor  # [B, H_kv, T, D] keys after RoPE
    v: torch.Tensor  # [B, H_kv, T, D]
    cos: torch.Tensor  # [B, T, D] RoPE tables at these tokens' positions
    sin: torch.Tensor  # [B, T, D]
    positions: torch.Tensor  # [B, T] int64 position in the row's own sequence; -1 marks padding
    layer_input: torch.Tensor | None  # [B, T, hidden] residual stream before the input norm
    is_prefill: bool
    # positions >= 0, when the caller has it already: a session computes it once a forward
    # instead of once a layer (a launch a layer of a captured decode step)
    valid_mask: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] bool: True for real tokens, False for left padding."""
        return self.valid_mask if self.valid_mask is not None else self.positions >= 0


class LayerCache(ABC):
    """One layer's KV storage for one batch, and attention over it."""

    @abstractmethod
    def append(self, new: NewTokens) -> None:
        """Store the keys and values of new tokens (a prefill chunk or a decode step)."""

    @abstractmethod
    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scaling: float) -> torch.Tensor:
        """Causal attention of queries [B, H, T, D] (after RoPE) over everything stored.

        `q_positions` [B, T] gives each query's position (-1 for padding). Returns [B, H, T, D].
        """

    def nbytes(self) -> int:
        """Bytes of KV storage this cache holds. Packed caches must report what they allocate."""
        return 0


@dataclass
class KVMethod(ABC):
    """Base class of every compression method. Subclasses are dataclasses; fields are parameters.

    Fields declare their allowed values through `dataclasses.field(metadata=...)`:
    `choices` (a tuple) and `help` (a sentence for `kvbench list`).
    """

    #: Registry name; one file in methods/ per method.
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Storage modes this method implements. "simulated" keeps dequantized copies (fake
    #: quantization: the numbers are right, the memory saving is not real); "packed" stores codes.
    modes: ClassVar[tuple[str, ...]] = ("simulated",)
    needs_calibration: ClassVar[bool] = False
    #: True when the method reads the residual stream entering each layer (costs a hook).
    needs_layer_input: ClassVar[bool] = False

    mode: str = dataclasses.field(
        default="simulated", metadata={"help": "simulated (fake quantization) or packed (real codes)"}
    )

    def __post_init__(self) -> None:
        check(self.mode in self.modes, "mode", f"{self.mode!r} is not one of {', '.join(self.modes)}")

    # -- what the harness asks -------------------------------------------------------------

    @abstractmethod
    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        """A fresh, empty cache for one layer of one batch."""

    @abstractmethod
    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        """Bits per stored K/V element at `context_len` tokens, counting scales, zero points
        and tokens kept in full precision (16 bits each)."""

    def check_geometry(self, geometry: KVGeometry) -> None:
        """Raise ParamError when a parameter does not fit this model (a group size, say)."""

    def requires_cuda(self) -> bool:
        """True when this configuration cannot run on a CPU (a packed mode with GPU kernels)."""
        return False

    # -- calibration (only for methods with needs_calibration) -----------------------------

    def observe(self, layer_idx: int, new: NewTokens) -> None:
        """Called for every layer during a clean full-precision pass over calibration text."""

    def calibration_state(self) -> dict[str, torch.Tensor]:
        """What `observe` learned, as tensors to cache on disk."""
        return {}

    def load_calibration_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `calibration_state` returned (from the disk cache or a fresh pass)."""

    def calibration_params(self) -> dict[str, Any]:
        """The parameters that change what calibration learns (part of the cache key)."""
        return {}

    # -- reporting -------------------------------------------------------------------------

    @property
    def simulated(self) -> bool:
        return self.mode == "simulated"

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def fp_bits_mix(quantized_bits: float, full_precision_tokens: float, context_len: int) -> float:
    """Average bits per element when `full_precision_tokens` of `context_len` stay in fp16."""
    fp = min(max(full_precision_tokens, 0.0), float(context_len))
    return (fp * 16.0 + (context_len - fp) * quantized_bits) / context_len
