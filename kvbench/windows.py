"""WikiText-2 evaluation windows and the teacher-forced pass shared by perplexity and kl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvbench import data
from kvbench.method import KVMethod
from kvbench.model import LoadedModel, cache_dir
from kvbench.params import check
from kvbench.session import KVSession
from kvbench.task import Task

#: States the protocol in every result of these tasks.
PROTOCOL = (
    "WikiText-2 raw test (CRLF normalised), tokenised without special tokens, non-overlapping "
    "windows of seq_len; every query attends to the compressed K/V of all earlier tokens and "
    "its own (keys and values compressed before attention, as in the RotateKV and KVQuant papers); "
    "tokens a method keeps in full precision (recent window, sinks) are exact as the method defines"
)


def wikitext_windows(lm: LoadedModel, seq_len: int, max_windows: int | None) -> tuple[torch.Tensor, str]:
    """[N, seq_len] token windows and the data source; token ids are cached per tokenizer."""
    text, source = data.wikitext2_test()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    vocab = hashlib.sha256(str(sorted(lm.tokenizer.get_vocab().items())[:2000]).encode()).hexdigest()[:12]
    path = cache_dir() / "tokens" / f"wikitext2-{digest}-{vocab}.pt"
    if path.is_file():
        ids = torch.load(path, weights_only=True)
    else:
        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ids, path)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len), source


def window_logits(lm: LoadedModel, method: KVMethod, window: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of one window [T] with a fresh cache of `method`."""
    session = KVSession(method, lm.geometry)
    return lm.forward(session, window[None], torch.arange(window.numel())[None])[0]


# Summed NLL per (model, method parameters, window): a kl pass leaves it here, so a perplexity
# cell of the same method on the same windows need not run the model again (half the default
# benchmark's time). Same parameters mean the same numbers: the methods are deterministic.
_nll_memo: dict[tuple[str, str, str], float] = {}


def _memo_key(lm: LoadedModel, method: KVMethod, window: torch.Tensor) -> tuple[str, str, str]:
    params = json.dumps([method.name, method.params()], sort_keys=True, default=str)
    digest = hashlib.sha256(window.cpu().numpy().tobytes()).hexdigest()
    return f"{lm.source}|{lm.dtype}|{lm.device}", params, digest


def window_nll(lm: LoadedModel, method: KVMethod, window: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[float, bool]:
    """(summed next-token NLL of one window, whether it was reused from an earlier pass)."""
    key = _memo_key(lm, method, window)
    if logits is None and key in _nll_memo:
        return _nll_memo[key], True
    if logits is None:
        logits = window_logits(lm, method, window)
    nll = float(F.cross_entropy(logits[:-1], window[1:].to(logits.device), reduction="sum"))
    _nll_memo[key] = nll
    return nll, False


def reference_logprobs_path(lm: LoadedModel, seq_len: int, index: int, window: torch.Tensor) -> Path:
    key = hashlib.sha256(f"{lm.source}|{lm.dtype}|{lm.device.type}|{window.tolist()}".encode()).hexdigest()[:16]
    return cache_dir() / "reference" / f"{Path(lm.source).name}-{seq_len}-{index}-{key}.pt"


@dataclass
class WindowedTask(Task):
    """Base of the tasks that read WikiText-2 windows (perplexity, kl): their shared parameters."""

    seq_len: int = dataclasses.field(default=1024, metadata={"help": "tokens per window"})
    max_windows: int | None = dataclasses.field(default=None, metadata={"help": "windows to evaluate (null: all)"})

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, "seq_len", f"{self.seq_len} must be at least 2")
        check(self.max_windows is None or self.max_windows >= 1, "max_windows", "must be at least 1 or null")

    def context_len(self) -> int:
        return self.seq_len

    def protocol(self) -> str:
        return PROTOCOL
