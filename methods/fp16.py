"""fp16: no compression. The baseline every report compares against, run through the same path.

`mode: packed` gives fp16 the same treatment the packed compressed caches get for speed runs:
storage preallocated for the whole run and decode steps that can be captured into a CUDA graph
(`kvbench.decode.StaticKVCache`). Both modes store the same numbers.
"""

from dataclasses import dataclass

from kvbench.method import KVGeometry, KVMethod, LayerCache
from kvbench.simulated import SimulatedCache


@dataclass
class FP16(KVMethod):
    name = "fp16"
    description = "No compression: keys and values kept in the model's precision."
    modes = ("simulated", "packed")

    def new_cache(self, layer_idx: int, geometry: KVGeometry) -> LayerCache:
        if self.mode == "packed":
            from kvbench.decode import StaticKVCache

            return StaticKVCache(geometry)
        return SimulatedCache()

    def avg_bits(self, geometry: KVGeometry, context_len: int) -> float:
        return 16.0
