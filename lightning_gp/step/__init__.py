"""The intercepted training step: what happens between Lightning calling ``training_step`` and the loss it returns.

``interception`` wraps the module's ``training_step`` (DDP-safe); ``_chain`` runs the loss-changing callbacks in
one fixed order (``_chain.ORDER``) over the step's ``_objective`` and owns the extra pass's isolation
(``StepContext.extra_pass``: logging muted, the module's state put back by ``_module_state``, the RNG forked or
replayed). ``_site`` and ``_batch`` say where an input-space method perturbs (the batch's input, or any layer's
output); ``_reduction`` reads how the loss reduces over the batch; ``_finite`` checks the values a step adds with
one host read; ``_cost`` meters each pass for :class:`~lightning_gp.monitors.CostMonitor`.

It imports ``functional`` and ``_lightning`` only; ``callbacks``, ``monitors``, ``gan`` and ``manual`` import it.
``interception`` is public (for a callback of one's own); the rest is internal.
"""
