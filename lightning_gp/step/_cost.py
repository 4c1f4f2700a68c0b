"""What each part of a training step costs: its forward and backward passes and its share of the step's wall time.

A :class:`PassMeter` is active for one measured step. Whoever runs code in the step opens a span with
:func:`span` (the chain around each penalty callback's ``apply``, :class:`~lightning_gp.CostMonitor` around every
callback hook); what happens outside every span is the step's own (``training_step``, Lightning's backward, the
optimizer). Passes are counted on the model itself: forward hooks on its layers with parameters count their calls,
and a tensor hook on each output counts the gradients that reach it (``loss.backward()`` and
``torch.autograd.grad`` alike). The unit is the step's own pass: a layer called k times in the plain
``training_step`` counts k calls (and k gradients) per pass. Time comes from ``time.perf_counter`` on the CPU and
from CUDA events on a GPU, read once, after the step (no host synchronization inside it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: The owner of what runs outside every span: the user's step and Lightning's own work around it.
STEP = "step"

_ACTIVE: list[PassMeter] = []  # the meter of the step being measured (at most one)


@dataclass
class Usage:
    """One owner's measured share of a step."""

    calls: dict[str, int] = field(default_factory=dict)  # layer name → forward calls
    grads: dict[str, int] = field(default_factory=dict)  # layer name → gradients arrived at its outputs


class _Clock:
    """Wall-clock marks: floats on the CPU, recorded CUDA events on a GPU (read by :meth:`seconds` afterwards)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


class PassMeter:
    """Counts each owner's passes and time over one step of ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.clock = _Clock(device)
        self.usage: dict[str, Usage] = {STEP: Usage()}
        self._stack: list[str] = []  # the owners of the open spans
        self._open: list[int] = []  # their indices in _spans
        self._spans: list[list] = []  # [owner, index of the enclosing span or None, start mark, end mark]
        self._handles: list[Any] = []
        self._start = self._end = None

    @property
    def owner(self) -> str:
        return self._stack[-1] if self._stack else STEP

    def start(self) -> None:
        layers = [(n or "_root", m) for n, m in self.model.named_modules()
                  if any(p.requires_grad for p in m.parameters(recurse=False))]
        for name, module in layers:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        self._start = self.clock.mark()
        _ACTIVE[:] = [self]

    def stop(self) -> None:
        self._end = self.clock.mark()
        self.close()

    def close(self) -> None:
        """Remove every hook and deactivate (also when the step raised)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if _ACTIVE and _ACTIVE[0] is self:
            _ACTIVE.clear()

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            usage = self.usage.setdefault(self.owner, Usage())
            usage.calls[name] = usage.calls.get(name, 0) + 1
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, Tensor) and out.requires_grad and torch.is_grad_enabled():
                handle = out.register_hook(self._grad_hook(name))
                self._handles.append(handle)

        return hook

    def _grad_hook(self, name: str):
        def hook(grad: Tensor) -> None:
            usage = self.usage.setdefault(self.owner, Usage())
            usage.grads[name] = usage.grads.get(name, 0) + 1

        return hook

    @contextlib.contextmanager
    def span(self, owner: str) -> Iterator[None]:
        """What runs in the block is ``owner``'s (nested spans: the innermost owner's)."""
        parent = self._open[-1] if self._open else None
        index = len(self._spans)
        self._spans.append([owner, parent, self.clock.mark(), None])
        self._stack.append(owner)
        self._open.append(index)
        try:
            yield
        finally:
            self._spans[index][3] = self.clock.mark()
            self._open.pop()
            self._stack.pop()

    def report(self) -> dict[str, dict[str, float]]:
        """``{owner: {"forward": passes, "backward": passes, "time_fraction": share}}`` of the step, the step's own
        row included. An owner's time excludes the spans nested in it (their owners'); the step's is the rest.
        Empty when the step's own pass ran no layer (nothing to count passes in)."""
        unit = self._unit()
        if unit is None:
            return {}
        total = self.clock.seconds(self._start, self._end)
        durations = [self.clock.seconds(start, end) for _, _, start, end in self._spans]
        own: dict[str, float] = {}
        for (owner, parent, _, _), seconds in zip(self._spans, durations, strict=True):
            own[owner] = own.get(owner, 0.0) + seconds
            if parent is not None:
                outer = self._spans[parent][0]
                own[outer] = own.get(outer, 0.0) - seconds
        own[STEP] = total - sum(t for o, t in own.items() if o != STEP)
        name, per_pass = unit
        out = {}
        for owner in dict.fromkeys([*self.usage, *own]):
            usage = self.usage.get(owner, Usage())
            share = min(max(own.get(owner, 0.0) / total, 0.0), 1.0) if total > 0 else 0.0
            out[owner] = {"forward": usage.calls.get(name, 0) / per_pass,
                          "backward": usage.grads.get(name, 0) / per_pass, "time_fraction": share}
        return out

    def _unit(self) -> tuple[str, int] | None:
        """The layer passes are counted on: the first one the step's own pass called, and its calls per pass."""
        calls = self.usage[STEP].calls
        for name, count in calls.items():
            if count > 0:
                return name, count
        return None


@contextlib.contextmanager
def span(owner: Any) -> Iterator[None]:
    """``owner``'s span in the active meter (its class name), a no-op when no step is measured."""
    if not _ACTIVE:
        yield
        return
    with _ACTIVE[0].span(owner if isinstance(owner, str) else type(owner).__name__):
        yield
