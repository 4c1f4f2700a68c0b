import os

import pytest
import torch

# W&B never needs an account or the network in tests: offline runs, files under the test's tmp dir.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
# Two cores: keep each test process single-threaded so DDP ranks don't fight over them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Standalone scripts launched by tests/ddp.py (Lightning's DDP launcher re-executes them); not test modules.
collect_ignore_glob = ["ddp_scripts/*"]
