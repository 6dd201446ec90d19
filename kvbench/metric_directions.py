"""Which way each metric should move, and how far it may drift before a change counts.

`kvbench compare` gates on this table and `kvbench report` uses it to colour deltas. A metric
not in the table is resolved by suffix rules on its name, so tasks can add metrics without
touching this file. Nested metrics such as ``ctx4096.accuracy`` or ``depth0.25.ctx2048.accuracy``
follow the rule of their last component (``accuracy``).

Tolerances are deliberately a little loose: the default CI run is CPU float32 and reproducible to
many digits, but the same baseline is also compared after torch/transformers upgrades, where
kernels change summation order. A bug such as a wrong clip ratio moves ppl by tens of percent,
far beyond these margins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# Directions.
LOWER = "lower"  # smaller is better (ppl, latency, bytes)
HIGHER = "higher"  # larger is better (accuracy, throughput)
NEUTRAL = "neutral"  # must not change at all (token counts): a change is a warning
INFO = "info"  # shown, never gated (unknown metrics)
DIRECTIONS = (LOWER, HIGHER, NEUTRAL, INFO)

# Kinds: what the number measures. Speed and memory depend on the hardware, so compare only
# gates them when baseline and current ran on the same device.
QUALITY = "quality"
SPEED = "speed"
MEMORY = "memory"
COUNT = "count"
HARDWARE_KINDS = (SPEED, MEMORY)


@dataclass(frozen=True)
class MetricRule:
    """How to judge one metric.

    A change is within tolerance when ``|current - baseline| <= max(abs_tol, rel_tol * |baseline|)``.
    Both limits exist because a relative limit alone breaks down near zero (the KL of fp16 against
    itself is 0) and an absolute one alone does not scale across models.
    `informational` rules are shown with their verdict but never fail the gate (avg_bits is a
    property of the configuration, not a result).
    `delta_style` says how the report prints the delta against fp16: scores bounded in [0, 1] read
    better as absolute points (0.80 -> 0.84 is +0.04, not +5%).
    """

    direction: str
    abs_tol: float = 0.0
    rel_tol: float = 0.0
    kind: str = QUALITY
    informational: bool = False
    delta_style: str = "rel"  # "rel" or "abs"
    source: str = "table"  # "table", "suffix", "default" or "tolerances": for messages only

    def threshold(self, baseline: float) -> float:
        return max(self.abs_tol, self.rel_tol * abs(baseline))

    def describe_tolerance(self) -> str:
        if self.direction == NEUTRAL:
            return "exact"
        if self.direction == INFO or self.informational:
            return "info"
        parts = []
        if self.rel_tol:
            parts.append(f"±{self.rel_tol * 100:g}%")
        if self.abs_tol:
            parts.append(f"±{self.abs_tol:g}")
        text = " or ".join(parts) if parts else "exact"
        return f"{text} (noise)" if self.kind == SPEED else text


def _score(abs_tol: float = 0.01) -> MetricRule:
    return MetricRule(HIGHER, abs_tol=abs_tol, delta_style="abs")


def _speed(direction: str, rel_tol: float = 0.10) -> MetricRule:
    # Timings are noisy even on an idle machine: compare as a ratio with a noise margin.
    return MetricRule(direction, rel_tol=rel_tol, kind=SPEED)


#: Known metrics. Keep in sync with docs/regression-gate.md.
METRICS: dict[str, MetricRule] = {
    # Language-modelling quality.
    "ppl": MetricRule(LOWER, rel_tol=0.01),
    "nll": MetricRule(LOWER, abs_tol=0.01),  # nll = log(ppl): 0.01 nats ~ 1% ppl
    # KL is measured against the uncompressed model, so fp16's is ~0 and a delta against it reads
    # better in absolute terms (delta_style) than as +300000%.
    "kl_mean": MetricRule(LOWER, abs_tol=1e-4, rel_tol=0.10, delta_style="abs"),
    "kl_p99": MetricRule(LOWER, abs_tol=1e-3, rel_tol=0.10, delta_style="abs"),
    "top1_agreement": _score(0.005),
    # Task scores in [0, 1].
    "accuracy": _score(),
    "exact_match": _score(),
    "partial_match": _score(),
    "f1": _score(),
    "rouge_l": _score(),
    "edit_sim": _score(),
    "fp16_agreement": _score(),
    # Position of the first generated token that differs from fp16: an index, noisy.
    "first_divergence": MetricRule(HIGHER, abs_tol=1.0, rel_tol=0.10),
    # Configuration-derived.
    "avg_bits": MetricRule(LOWER, abs_tol=0.01, informational=True),
    "tokens": MetricRule(NEUTRAL, kind=COUNT),
    "windows": MetricRule(NEUTRAL, kind=COUNT),
    "samples": MetricRule(NEUTRAL, kind=COUNT),
    # Memory.
    "peak_allocated_bytes": MetricRule(LOWER, rel_tol=0.05, kind=MEMORY),
    "peak_reserved_bytes": MetricRule(LOWER, rel_tol=0.05, kind=MEMORY),
    "kv_bytes": MetricRule(LOWER, rel_tol=0.01, kind=MEMORY),
    "max_batch": MetricRule(HIGHER, rel_tol=0.05, kind=MEMORY),
    # Speed.
    "decode_ms_p50": _speed(LOWER),
    "decode_ms_p90": _speed(LOWER, 0.15),  # tails are noisier than medians
    "attention_ms": _speed(LOWER),
    "tokens_per_s": _speed(HIGHER),
    "bandwidth_fraction": _speed(HIGHER),
    "achieved_gbps": _speed(HIGHER),
}

# Suffix rules for metrics not in the table, tried in order; the first match wins.
# (suffix, rule): matched against the last dotted component of the name.
SUFFIX_RULES: list[tuple[str, MetricRule]] = [
    ("_per_s", _speed(HIGHER)),
    ("_gbps", _speed(HIGHER)),
    ("throughput", _speed(HIGHER)),
    ("_ms", _speed(LOWER)),
    ("_seconds", _speed(LOWER)),
    ("latency", _speed(LOWER)),
    ("_bytes", MetricRule(LOWER, rel_tol=0.05, kind=MEMORY)),
    ("_accuracy", _score()),
    ("_acc", _score()),
    ("_match", _score()),
    ("_agreement", _score()),
    ("_f1", _score()),
    ("_score", _score()),
    ("_ppl", MetricRule(LOWER, rel_tol=0.01)),
    ("_nll", MetricRule(LOWER, abs_tol=0.01)),
    ("_loss", MetricRule(LOWER, rel_tol=0.01)),
    ("_mse", MetricRule(LOWER, abs_tol=1e-6, rel_tol=0.10)),
    ("_error", MetricRule(LOWER, abs_tol=1e-6, rel_tol=0.10)),
    ("_count", MetricRule(NEUTRAL, kind=COUNT)),
    ("_tokens", MetricRule(NEUTRAL, kind=COUNT)),
]
# Prefix rules, after suffixes: "kl_*" divergences are lower-is-better.
PREFIX_RULES: list[tuple[str, MetricRule]] = [
    ("kl_", MetricRule(LOWER, abs_tol=1e-3, rel_tol=0.10, delta_style="abs")),
    ("num_", MetricRule(NEUTRAL, kind=COUNT)),
]

#: Rule for names nothing matches: shown, never gated.
UNKNOWN = MetricRule(INFO, source="default")


def base_name(metric: str) -> str:
    """The last dotted component: ``ctx4096.accuracy`` -> ``accuracy``."""
    return metric.rsplit(".", 1)[-1]


def known_rule(name: str) -> MetricRule | None:
    """The table or suffix rule for a name, or None when nothing matches."""
    base = base_name(name)
    if base in METRICS:
        return METRICS[base]
    for suffix, rule in SUFFIX_RULES:
        if base.endswith(suffix):
            return replace(rule, source="suffix")
    for prefix, rule in PREFIX_RULES:
        if base.startswith(prefix):
            return replace(rule, source="suffix")
    return None


def rule_for(name: str) -> MetricRule:
    """The rule for a metric name (possibly nested-flattened)."""
    return known_rule(name) or UNKNOWN


def is_better(rule: MetricRule, baseline: float, current: float) -> bool:
    """True when `current` is an improvement on `baseline` under the rule's direction."""
    if rule.direction == LOWER:
        return current < baseline
    if rule.direction == HIGHER:
        return current > baseline
    return False


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
