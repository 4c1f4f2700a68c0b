"""Runnable examples (``python -m examples.robust_digits``); a regular package so that it is found before
any ``examples`` package another distribution installs into site-packages (Opacus ships one)."""
