"""Run a script under real multi-process DDP (2 CPU processes, gloo) and read back its result.

Lightning's ``strategy="ddp"`` launches the other ranks by re-executing ``sys.argv``; under pytest that
would re-run pytest itself, so each DDP test runs a small standalone script in ``tests/ddp_scripts``.
The script writes ``torch.save``-able results from rank 0 to the path it is given.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parent / "ddp_scripts"
REPO = Path(__file__).parent.parent


def run_ddp_script(name: str, out_path: Path, *args: str, timeout: float = 240) -> dict:
    """Run ``tests/ddp_scripts/<name>`` with ``--out out_path`` and return ``torch.load(out_path)``."""
    # A process group another test left in this process (a strategy set up in-process) holds its port:
    # the script's ranks pick their own.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                                                          "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, str(SCRIPTS / name), "--out", str(out_path), *args]
    proc = subprocess.run(cmd, env=env, cwd=out_path.parent, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"DDP script {name} failed (exit {proc.returncode}).\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return torch.load(out_path, weights_only=False)


def close_process_group() -> None:
    """End a DDP script cleanly: wait for every rank, then destroy the process group.

    Left to interpreter exit, gloo's worker threads are torn down by static destructors and a rank can abort
    with "terminate called without an active exception" after its results are written (seen about once in
    six runs of targets_ddp.py), which fails the test for nothing.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
