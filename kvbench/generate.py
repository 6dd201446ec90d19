"""Greedy generation through a method's compressed cache: the decode loop of every generation task.

`greedy_generate(lm, method, prompts, max_new_tokens, stop=...)` runs prompts (token ids) in
batches with LEFT padding: positions come from the attention mask (`left_padded_positions`,
-1 for padding), so every row's tokens sit at their own positions and padding is invisible to
attention and to the methods (sink detection, KIVI's groups) by construction. Each batch gets a
fresh `KVSession`: one prefill (logits of the last position only), then one token per step for
every row. A row stops at an EOS token, at a stop string in its own decoded text, or at
`max_new_tokens`; the batch stops when every row has. Rows that stopped keep feeding a pad token
(at their next position, so the cache stays well formed) and what they produce is discarded.

Prompts are sorted by length before batching to limit padding; results come back in input
order. Batched and unbatched runs give the same tokens (tests/test_generate.py), up to float
rounding differences between batch shapes.

`fp16_reference(ctx, ...)` caches the uncompressed generations of a task's prompts on disk, so
the agreement metrics of every method compare against one fp16 run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.method import KVMethod
from kvbench.model import LoadedModel
from kvbench.session import KVSession, left_padded_positions
from kvbench.textmetrics import agreement

# End-of-turn tokens that end a generation when the tokenizer knows them as special tokens.
_EOS_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end_of_text|>")


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the EOS or the token completing a stop string included
    text: str  # decoded without special tokens, cut before the first stop string
    stop_reason: str  # "eos", "stop" or "length"
    prompt_len: int


def eos_token_ids(lm: LoadedModel) -> set[int]:
    """The ids that end a generation: the tokenizer's and generation config's EOS, and the
    usual end-of-turn tokens (SmolLM2's GGUF names <|im_start|> as EOS but ends turns with
    <|im_end|>)."""
    tok = lm.tokenizer
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen_cfg = getattr(lm.model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    if cfg_eos is not None:
        ids.update(int(i) for i in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]))
    special = set(getattr(tok, "all_special_tokens", []) or [])
    for name in _EOS_NAMES:
        if name in special or name in getattr(tok, "added_tokens_encoder", {}):
            i = tok.convert_tokens_to_ids(name)
            if isinstance(i, int) and i != tok.unk_token_id:
                ids.add(i)
    return ids


def pad_token_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    for i in (tok.pad_token_id, tok.eos_token_id, 0):
        if i is not None:
            return int(i)
    return 0


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def batches_by_length(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of similar length (longest first, ties in input order)."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def greedy_generate(
    lm: LoadedModel,
    method: KVMethod,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    eos_ids: set[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy continuations of `prompts` (lists of token ids) through `method`'s cache.

    `stop` strings end a row when they appear in its decoded generation (the text is cut before
    them); `eos_ids` defaults to `eos_token_ids(lm)`. `on_batch(n)` is called after each batch
    with the number of prompts it held (for progress bars).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    eos = eos_token_ids(lm) if eos_ids is None else set(eos_ids)
    out: list[Generation | None] = [None] * len(prompts)
    for idx in batches_by_length(prompts, batch_size):
        gens = _generate_batch(lm, method, [list(prompts[i]) for i in idx], max_new_tokens, tuple(stop), eos)
        for i, g in zip(idx, gens):
            out[i] = g
        if on_batch is not None:
            on_batch(len(idx))
    return out  # type: ignore[return-value]


def _generate_batch(
    lm: LoadedModel,
    method: KVMethod,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop: tuple[str, ...],
    eos: set[int],
) -> list[Generation]:
    tok = lm.tokenizer
    b, length = len(prompts), max(len(p) for p in prompts)
    pad = pad_token_id(lm)
    ids = torch.full((b, length), pad, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, length - len(p) :] = 1
    positions = left_padded_positions(mask)

    session = KVSession(method, lm.geometry)
    logits = lm.forward(session, ids, positions, logits_to_keep=1)[:, -1]
    next_pos = positions[:, -1:] + 1  # [B, 1]: every row ends with a real token
    tokens: list[list[int]] = [[] for _ in range(b)]
    reasons: list[str | None] = [None] * b
    for step in range(max_new_tokens):
        chosen = logits.argmax(-1).tolist()
        for r in range(b):
            if reasons[r] is not None:
                continue
            t = int(chosen[r])
            tokens[r].append(t)
            if t in eos:
                reasons[r] = "eos"
                continue
            if stop:
                if _cut_at_stop(tok.decode(tokens[r], skip_special_tokens=True), stop)[1]:
                    reasons[r] = "stop"
                    continue
            if len(tokens[r]) >= max_new_tokens:
                reasons[r] = "length"
        if all(x is not None for x in reasons):
            break
        feed = torch.tensor([[pad if reasons[r] is not None else int(chosen[r])] for r in range(b)])
        logits = lm.forward(session, feed, next_pos, logits_to_keep=1)[:, -1]
        next_pos = next_pos + 1
    return [
        Generation(tokens[r], _cut_at_stop(tok.decode(tokens[r], skip_special_tokens=True), stop)[0],
                   reasons[r] or "length", len(prompts[r]))
        for r in range(b)
    ]


# ------------------------------------------------------------------------------------------------
# Agreement with the fp16 generation, computed once and cached on disk
# ------------------------------------------------------------------------------------------------


def is_reference(method: KVMethod) -> bool:
    """True for the uncompressed baseline, whose own generations are the reference."""
    return method.name == "fp16"


def reference_key(lm: LoadedModel, prompts: Sequence[Sequence[int]], settings: dict) -> str:
    blob = json.dumps(
        {
            "model": lm.source,
            "dtype": str(lm.dtype),
            "device": lm.device.type,
            "prompts": [list(map(int, p)) for p in prompts],
            "settings": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def fp16_reference(
    ctx,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    own: list[Generation] | None = None,
    tag: str = "generations",
) -> list[list[int]] | None:
    """Token sequences of the fp16 generation of `prompts`, from the disk cache or computed once.

    `ctx` is a `TaskContext`. When the method under test is fp16 itself, `own` (its generations)
    is the reference. Returns None when there is no reference method. The cache lives under
    `ctx.cache_dir/fp16_generations/`, keyed by model source, dtype, device, prompt ids and the
    generation settings, so each fp16 run happens once per output directory.
    """
    settings = {"max_new_tokens": max_new_tokens, "stop": list(stop), "batch_size": batch_size,
                "eos": sorted(eos_token_ids(ctx.lm))}
    path = Path(ctx.cache_dir) / "fp16_generations" / f"{tag}-{reference_key(ctx.lm, prompts, settings)}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data["tokens"]) == len(prompts):
                return data["tokens"]
        except (ValueError, KeyError):
            pass  # a damaged file: compute again
    if own is not None and is_reference(ctx.method):
        tokens = [g.tokens for g in own]
    elif ctx.reference_method is None:
        return None
    else:
        ctx.progress.start("fp16 reference generations", len(prompts))
        gens = greedy_generate(ctx.lm, ctx.reference_method, prompts, max_new_tokens, stop=stop,
                               batch_size=batch_size, on_batch=ctx.progress.advance)
        tokens = [g.tokens for g in gens]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"settings": settings, "tokens": tokens}))
    tmp.replace(path)
    return tokens


def agreement_metrics(gens: Sequence[Generation], reference: Sequence[Sequence[int]] | None) -> dict[str, float]:
    """{"fp16_agreement": share of generations token-identical to fp16, "first_divergence": mean
    index of the first differing token}; empty without a reference."""
    if reference is None or not gens:
        return {}
    scores = [agreement(g.tokens, ref) for g, ref in zip(gens, reference)]
    return {
        "fp16_agreement": sum(s["exact"] for s in scores) / len(scores),
        "first_divergence": sum(s["first_divergence"] for s in scores) / len(scores),
    }


def per_item_agreement(gens: Sequence[Generation], reference: Sequence[Sequence[int]] | None) -> list[dict] | None:
    if reference is None:
        return None
    return [agreement(g.tokens, ref) for g, ref in zip(gens, reference)]


# ------------------------------------------------------------------------------------------------
# Helpers shared by the generation tasks
# ------------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, text: str, chat: bool = False, assistant_prefix: str = "") -> list[int]:
    """Token ids of a prompt: raw text (with the tokenizer's own special tokens, BOS for Llama),
    or with `chat` and a chat template, `text` as the user turn followed by the assistant header
    and `assistant_prefix` (the start of the answer)."""
    if chat and has_chat_template(tokenizer):
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(templated + assistant_prefix, add_special_tokens=False).input_ids)
    return list(tokenizer(text + assistant_prefix).input_ids)


def chat_overhead(tokenizer, chat: bool, assistant_prefix: str = "") -> int:
    """Tokens that `encode_prompt` adds around the text (chat template, BOS, answer prefix)."""
    return len(encode_prompt(tokenizer, "", chat, assistant_prefix))


def generate_with_reference(
    ctx,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    tag: str,
    description: str,
) -> tuple[list[Generation], list[list[int]] | None]:
    """The method's generations of `prompts` and the fp16 reference tokens (cached on disk)."""
    ctx.progress.start(description, len(prompts))
    gens = greedy_generate(ctx.lm, ctx.method, prompts, max_new_tokens, stop=stop,
                           batch_size=batch_size, on_batch=ctx.progress.advance)
    reference = fp16_reference(ctx, prompts, max_new_tokens=max_new_tokens, stop=stop,
                               batch_size=batch_size, own=gens, tag=tag)
    return gens, reference


def axis_label(value: float) -> str:
    """Sweep values in metric names: 0.0 -> "0", 0.25 -> "0.25", 1024 -> "1024"."""
    return f"{value:g}"
