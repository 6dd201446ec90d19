"""fp16: no compression. The baseline every report compares against, run through the same path."""

from dataclasses import dataclass

from kvbench.method import KVGeometry, KVMethod, LayerCache
from kvbench.simulated import SimulatedCache


@dataclass
class FP16(KVMethod):
    name = "fp16"
    description = "No compression: keys and values kept in the model's precision."

    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        return SimulatedCache()

    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        return 16.0
