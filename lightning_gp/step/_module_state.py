"""What an extra pass of ``training_step`` may change on the user's module, saved before it and put back after.

Lightning runs ``training_step`` once a step; the callbacks run it again (finite differences, attacks, VAT,
the reduction check). Whatever the user's step changes besides the loss must then change once, as in a plain
run. Restored after every extra pass: every buffer (BatchNorm statistics among them), every torchmetrics
``Metric``'s states and update count, and each module's public plain attributes: numbers, strings and
booleans, and the contents of lists and dicts (``self.seen += len(y)``, ``self.outputs.append(...)``).
Attributes whose names start with "_" (``nn.Module``'s own bookkeeping among them) and other objects that a step
mutates in place are not tracked. Design: ``docs/design/interception.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric

from lightning_gp._lightning.private import metric_update_count, set_metric_update_count
from lightning_gp.functional._state import BufferSnapshot

_PLAIN = (int, float, bool, str, type(None))


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class _Contents:
    """A list's or dict's items, put back into the same object (references to it elsewhere stay valid)."""

    def __init__(self, container: list | dict) -> None:
        self.container, self.items = container, type(container)(container)

    def restore(self) -> list | dict:
        self.container.clear()
        if isinstance(self.container, dict):
            self.container.update(self.items)
        else:
            self.container.extend(self.items)
        return self.container


class ModuleState:
    """A snapshot of what :mod:`lightning_gp.step._module_state` restores (see there)."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = BufferSnapshot(module)
        self.metrics = [(m, {k: _copy(v) for k, v in m.metric_state.items()}, metric_update_count(m))
                        for m in module.modules() if isinstance(m, Metric)]
        self.attributes: list[tuple[Any, str, Any]] = []
        for m in module.modules():
            if isinstance(m, Metric):
                continue
            for name, value in vars(m).items():
                if name.startswith("_") or name == "training":
                    continue
                if isinstance(value, _PLAIN):
                    self.attributes.append((m, name, value))
                elif type(value) in (list, dict):
                    self.attributes.append((m, name, _Contents(value)))

    def restore(self) -> None:
        self.buffers.restore()
        for metric, states, count in self.metrics:
            for name, value in states.items():
                setattr(metric, name, _copy(value))
            set_metric_update_count(metric, count)
        for owner, name, saved in self.attributes:
            owner.__dict__[name] = saved.restore() if isinstance(saved, _Contents) else saved


@contextlib.contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """Run an extra pass of ``module``'s step; its side effects on ``module`` are undone on exit."""
    state = ModuleState(module)
    try:
        yield
    finally:
        state.restore()
