"""The one way into the training step: a wrapper of ``LightningModule.training_step`` that every
loss-changing callback and the fused monitor register with.

Why a wrapper: Lightning has no public hook that may change the loss. The automatic-optimization closure
passes what ``training_step`` returned straight to ``strategy.backward``, and ``Precision.pre_backward``
(which calls ``on_before_backward``) returns the tensor it was given; a second backward per forward breaks
DDP's reducer. So the wrapper returns ``loss + terms`` and Lightning runs its one backward on it. Under DDP,
Lightning looks ``training_step`` up on the module at call time inside ``DistributedDataParallel.forward``,
so the wrapper runs there. Sources and line numbers: ``docs/design/interception.md``.

Rules (each one has a test):

- installed once per module however many callbacks register; removed when the last one leaves (at
  ``teardown`` and ``on_exception``);
- restored only if the attribute is still the wrapper, else left as it is, with a warning (the wrapper,
  if still called from inside the replacement, passes through);
- passes through when grad is disabled, when ``trainer.training`` is False (a ``validation_step`` that
  calls ``self.training_step``), or when the call comes from inside the wrapper itself;
- nothing else is rebound but ``log``/``log_dict`` during extra passes (:func:`muted_logging`).

Example:


    >>> import lightning.pytorch as pl
    >>> from lightning.pytorch.demos.boring_classes import BoringModel
    >>> from lightning_gp.step.interception import StepInterceptor
    >>> model = BoringModel()
    >>> interceptor = StepInterceptor.attach(pl.Trainer(logger=False), model)
    >>> interceptor.observe(print)  # called with the batch at the top of every training step
    >>> "training_step" in model.__dict__
    True
    >>> interceptor.unobserve(print)  # the last member leaves: the class method is back
    >>> "training_step" in model.__dict__
    False
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

_ATTR = "_lightning_gp_interceptor"

#: ``runner(interceptor, step_fn, args, kwargs)`` → the training step's output with the members' terms.
Runner = Callable[["StepInterceptor", Callable[..., Any], tuple, dict], Any]


class StepInterceptor:
    """Owns ``module.training_step`` while members are registered (see the module docstring).

    Two kinds of members: *observers*, called with the batch at the top of every intercepted step (the
    fused monitor starts its recording there), and *members* with an ``order``, run by ``runner`` (the
    penalty callbacks: :func:`lightning_gp.step._chain.run_chain`).
    """

    def __init__(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.trainer = trainer
        self.module = module
        self.had_instance_attr = "training_step" in module.__dict__
        self.original: Callable[..., Any] = module.training_step
        self.members: list[Any] = []
        self.observers: list[Callable[[Any], None]] = []
        self.runner: Runner | None = None
        self.active = True
        self._running = False
        #: The penalty callbacks' record of the current optimizer step (``lightning_gp.step._finite.StepValues``).
        self.step_values: Any = None

        # A real function (Lightning's `is_overridden` reads `__code__`); `wraps` keeps the user's signature
        # visible to `inspect.signature` (Lightning inspects it, e.g. for `dataloader_iter`).
        @functools.wraps(self.original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        self.wrapper = training_step

    # -- lifetime ---------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, trainer: pl.Trainer, module: pl.LightningModule) -> StepInterceptor:
        """The module's interceptor, installed on first use."""
        interceptor = module.__dict__.get(_ATTR)
        if interceptor is None or interceptor.trainer is not trainer:
            if interceptor is not None:
                interceptor.detach()
            interceptor = cls(trainer, module)
            module.__dict__[_ATTR] = interceptor
            module.training_step = interceptor.wrapper
        return interceptor

    @staticmethod
    def of(module: pl.LightningModule) -> StepInterceptor | None:
        """The module's installed interceptor, if any."""
        return module.__dict__.get(_ATTR)

    def register(self, member: Any, runner: Runner) -> None:
        """Add a member (it has an ``order``); all members are run by ``runner``."""
        self.runner = runner
        if member not in self.members:
            self.members.append(member)

    def unregister(self, member: Any) -> None:
        """Remove a member; the wrapper goes when no member and no observer is left."""
        if member in self.members:
            self.members.remove(member)
        self._detach_if_empty()

    def observe(self, observer: Callable[[Any], None]) -> None:
        """Call ``observer(batch)`` at the top of every intercepted training step."""
        if observer not in self.observers:
            self.observers.append(observer)

    def unobserve(self, observer: Callable[[Any], None]) -> None:
        """Remove an observer; the wrapper goes when no member and no observer is left."""
        if observer in self.observers:
            self.observers.remove(observer)
        self._detach_if_empty()

    def _detach_if_empty(self) -> None:
        if not self.members and not self.observers:
            self.detach()

    def detach(self) -> None:
        """Remove the wrapper: restore ``training_step`` if it is still the wrapper, else warn and leave it."""
        module = self.module
        if module.__dict__.get(_ATTR) is self:
            del module.__dict__[_ATTR]
        self.active = False
        self.members.clear()
        self.observers.clear()
        current = module.__dict__.get("training_step")
        if current is self.wrapper:
            if self.had_instance_attr:
                module.training_step = self.original
            else:
                del module.__dict__["training_step"]
        elif current is not self.original:
            rank_zero_warn(
                f"lightning_gp: `{type(module).__name__}.training_step` was replaced after lightning_gp wrapped "
                f"it, so it is left as it is now. lightning_gp's wrapper, if still called from inside the new "
                f"one, passes the call through unchanged."
            )

    # -- the call ---------------------------------------------------------------------------------------
    def intercepts(self) -> bool:
        """True when the call is a training step of ``fit`` (see the module docstring)."""
        return (
            self.active
            and not self._running
            and torch.is_grad_enabled()
            and self.trainer.training
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.intercepts():
            return self.original(*args, **kwargs)
        self._running = True
        try:
            if self.observers:
                batch = args[0] if args else kwargs.get("batch")
                for observer in self.observers:
                    observer(batch)
            if not self.members or self.runner is None:
                return self.original(*args, **kwargs)
            return self.runner(self, self.original, args, kwargs)
        finally:
            self._running = False


@contextlib.contextmanager
def muted_logging(module: torch.nn.Module) -> Iterator[None]:
    """Drop ``self.log``/``self.log_dict`` calls made while the block runs (extra passes must not log twice).

    Restores only what it set: an attribute replaced meanwhile is left alone.
    """
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}

    def mute(*args: Any, **kwargs: Any) -> None:
        return None

    module.__dict__["log"] = module.__dict__["log_dict"] = mute
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if module.__dict__.get(name) is mute:
                del module.__dict__[name]
                if name in saved:
                    module.__dict__[name] = saved[name]
