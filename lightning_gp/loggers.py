"""Deprecated alias of the package's private log writer (the name shadowed ``lightning.pytorch.loggers``).

Importing it warns; it will be removed in 0.3. The functions were never public API.
"""

import warnings

from lightning_gp._log_writer import *  # noqa: F403
from lightning_gp._log_writer import define_summaries, log_histograms, log_inequality, log_scalars, wandb_runs  # noqa: F401

warnings.warn("`lightning_gp.loggers` is deprecated and will be removed in 0.3: it was never public API, and its "
              "name shadowed `lightning.pytorch.loggers`.", DeprecationWarning, stacklevel=2)
