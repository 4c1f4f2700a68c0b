"""Everything the adapters need to know about Lightning, in one room (internal).

``private`` is the only module that reads a private name of Lightning or torchmetrics (each behind a test that
fails loudly when it moves); ``trainer`` reads the attached trainer, its loss scale and grad scaler;
``setup_checks`` refuses, in ``setup``, the strategies and steps a callback cannot serve; ``logging``,
``log_writer`` and ``epoch`` log values over all ranks, write W&B's tables and charts, and aggregate an epoch;
``arguments`` checks and prints the constructor arguments of the callbacks and monitors.

It imports ``functional`` only (and Lightning); everything above imports it.
"""
