"""The task interface: what a benchmark task is and what it is given to run one cell."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvbench.method import KVMethod
from kvbench.model import LoadedModel


class Progress:
    """Progress of the steps inside one cell (windows, prompts); the CLI renders it with rich."""

    def __init__(self, on_update: Callable[[str, int, int], None] | None = None):
        self._on_update = on_update
        self.description, self.done, self.total = "", 0, 0

    def start(self, description: str, total: int) -> None:
        self.description, self.done, self.total = description, 0, total
        self._emit()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._emit()

    def _emit(self) -> None:
        if self._on_update is not None:
            self._on_update(self.description, self.done, self.total)


@dataclass
class TaskContext:
    lm: LoadedModel
    method: KVMethod
    method_label: str
    seed: int
    cache_dir: Path  # for data a task may reuse across cells and runs (reference logits, ids)
    progress: Progress = field(default_factory=Progress)
    reference_method: KVMethod | None = None  # the uncompressed baseline, for agreement metrics


@dataclass
class TaskResult:
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)


@dataclass
class Task(ABC):
    """Base class of every task. Subclasses are dataclasses; fields are parameters."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Bump when prompts, data handling or metrics change; recorded with every result.
    version: ClassVar[int] = 1
    requires_cuda: ClassVar[bool] = False

    @abstractmethod
    def run(self, ctx: TaskContext) -> TaskResult: ...

    @abstractmethod
    def context_len(self) -> int:
        """The context length at which `avg_bits` is stated for this task's results."""

    def protocol(self) -> str:
        """One sentence stating how the number is measured; goes into every result."""
        return ""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
