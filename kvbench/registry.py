"""Lazy registries of methods and tasks, with did-you-mean misses.

Names are discovered without importing plugin code: one file per plugin in `methods/` or
`tasks/` (installed as `kvbench.methods` and `kvbench.tasks`; the file name is the plugin name),
plus entry points (`kvbench.methods`, `kvbench.tasks`) so a separate package can add plugins
without editing kvbench. A plugin module is imported only when its name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import inspect
from functools import cached_property

from kvbench.errors import UserError, did_you_mean


class Registry:
    def __init__(self, kind: str, package: str, entry_point_group: str, base: type):
        self.kind = kind
        self.package = package
        self.entry_point_group = entry_point_group
        self.base = base
        self._extra: dict[str, type] = {}

    @cached_property
    def _targets(self) -> dict[str, str]:
        """name -> "module" (a built-in file) or "module:attr" (an entry point)."""
        targets = {}
        for entry in importlib.resources.files(self.package).iterdir():
            if entry.name.endswith(".py") and not entry.name.startswith("_"):
                stem = entry.name[:-3]
                targets[stem] = f"{self.package}.{stem}"
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            targets.setdefault(ep.name, ep.value)
        return targets

    def names(self) -> list[str]:
        return sorted(set(self._targets) | set(self._extra))

    def register(self, cls: type) -> type:
        """Register a class directly (tests, notebooks). Its `name` attribute is the key."""
        self._extra[cls.name] = cls
        return cls

    def get(self, name: str) -> type:
        if name in self._extra:
            return self._extra[name]
        target = self._targets.get(name)
        if target is None:
            raise UserError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                f"available: {', '.join(self.names())}"
            )
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)
        if attr:
            return getattr(module, attr)
        found = [
            obj
            for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, self.base) and getattr(obj, "name", None) == name
        ]
        if len(found) != 1:
            raise RuntimeError(f"{module_name} must define exactly one {self.kind} named {name!r}")
        return found[0]


def _method_base():
    from kvbench.method import KVMethod

    return KVMethod


def _task_base():
    from kvbench.task import Task

    return Task


methods = Registry("method", "kvbench.methods", "kvbench.methods", _method_base())
tasks = Registry("task", "kvbench.tasks", "kvbench.tasks", _task_base())
