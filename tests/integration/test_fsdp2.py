"""FSDP2 (``ModelParallelStrategy`` with ``fully_shard``), 2 CPU processes with gloo, against one process on the
combined batch: every supported callback and the gradient-norm monitor, a distributed-checkpoint resume, and the
refusals (tensor parallelism here; the setup refusals in one process in tests/integration/test_strategies.py)."""

from __future__ import annotations

import pytest
import torch

from tests.fsdp2_cases import CONFIGS, FINITE_DIFFERENCES, LR, VERSUS_DDP, fit, full_state, logged

pytestmark = pytest.mark.ddp

EPS = torch.finfo(torch.float32).eps
#: What 3 steps of SGD with momentum 0.9 apply of an error in each step's gradient: LR·(1 + 1.9 + 2.71).
APPLIED = LR * (1 + 1.9 + 2.71)
#: The two sides sum in other orders (reduce-scatter against one batch), so each step's gradient differs by a few
#: float32 roundings of gradients of order 1: parameters by about EPS·APPLIED (measured 6e-8); tenfold.
ATOL = 10 * EPS * APPLIED
#: A finite difference divides that rounding by its relative step (1e-3 for the parameter penalty, the smallest)
#: and multiplies it by its weight (at most 0.3 here): parameters by about EPS/1e-3·0.3·APPLIED = 2e-5 (measured
#: up to 4.6e-6); twofold.
FD_ATOL = 2 * EPS / 1e-3 * 0.3 * APPLIED
#: The logged values (losses, penalties, norms of order 1 to 10).
METRIC_TOL = 1e-5


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> dict:
    from tests.ddp import run_ddp_script

    out = tmp_path_factory.mktemp("fsdp2") / "out.pt"
    results = run_ddp_script("fsdp2.py", out, timeout=420)
    results["nan"] = [torch.load(f"{out}.nan.rank{r}", weights_only=False) for r in (0, 1)]
    return results


def _close(got: dict, want: dict, what: str) -> None:
    atol = FD_ATOL if what in FINITE_DIFFERENCES else ATOL
    assert set(got["params"]) == set(want["params"])
    for key, value in want["params"].items():
        torch.testing.assert_close(got["params"][key], value, atol=atol, rtol=0, msg=f"{what} {key}")
    assert set(got["metrics"]) == set(want["metrics"]), what  # the same keys logged, none lost
    for key, value in want["metrics"].items():
        torch.testing.assert_close(got["metrics"][key].float(), value.float(), atol=METRIC_TOL, rtol=METRIC_TOL,
                                   msg=f"{what} {key}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_equals_one_process_on_the_combined_batch(fsdp2, name):
    trainer, model = fit(name, reference=True)
    _close(fsdp2[(name, "fsdp2")], {"params": full_state(model), "metrics": logged(trainer)}, name)


@pytest.mark.parametrize("name", list(VERSUS_DDP))
def test_fsdp2_equals_ddp_where_the_method_is_defined_per_rank_or_rounds_per_batch(fsdp2, name):
    _close(fsdp2[(name, "fsdp2")], fsdp2[(name, "ddp")], name)


def test_the_controls_tell_the_configurations_apart(fsdp2):
    """Each penalty changes training: a comparison that passed with the callbacks doing nothing would be empty."""
    plain = {"features": fsdp2[("plain_features", "fsdp2")], "tokens": fsdp2[("plain_tokens", "fsdp2")]}
    for name, (kind, _) in {**CONFIGS, **VERSUS_DDP}.items():
        if name.startswith(("plain", "grad_norm", "noise_scale")) or kind not in plain:
            continue  # monitors leave training as it is (their own tests hold them to that)
        got, base = fsdp2[(name, "fsdp2")]["params"], plain[kind]["params"]
        assert max((got[k] - base[k]).abs().max() for k in base) > 1e-4, name


def test_fsdp2_resumes_from_its_distributed_checkpoint_bit_for_bit(fsdp2):
    resumed, uninterrupted = fsdp2["resumed"], fsdp2["uninterrupted"]
    for key, value in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    # the callbacks' state came back from the checkpoint: 3 steps before it, 3 after
    assert resumed["states"] == uninterrupted["states"]
    assert all(state["applied"] == 6 for state in resumed["states"].values()), resumed["states"]


def test_tensor_parallelism_is_refused_in_setup(fsdp2):
    message = fsdp2["tp2"]
    assert message is not None, "tensor_parallel_size=2 trained"
    assert "ModelParallelStrategy(tensor_parallel_size=2)" in message
    assert "tensor_parallel_size=1" in message


def test_a_nan_on_one_rank_stops_every_rank_before_the_update(fsdp2):
    """One sample of rank 1 is NaN at step 1: both ranks raise (a rank that did not would hang the next case) and
    the sharded parameters stay finite; rank 1 names the batch, rank 0 the rank."""
    rank0, rank1 = fsdp2["nan"]
    assert set(rank0) == set(rank1) == {"asam_global", "fgm_input", "data_fd_input"}
    for name in rank0:
        assert rank0[name]["error"] and rank1[name]["error"], name
        assert rank0[name]["finite"] and rank1[name]["finite"], name
        assert "at global step 1 on rank 1" in rank1[name]["error"] and "batch[0]" in rank1[name]["error"], name
        assert "The parameters were not updated" in rank0[name]["error"], name
    assert "rank(s) [1]" in rank0["fgm_input"]["error"]
