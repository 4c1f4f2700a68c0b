import pytest
import torch

from lightning_gp.metrics import PerSampleMeanMax


def test_mean_is_weighted_by_sample_count_and_max_is_over_all_samples():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    metric = PerSampleMeanMax(num_values=4)
    metric.update(a)
    metric.update(b[:0])  # an empty share changes nothing
    metric.update(b)
    mean, maximum = metric.compute()
    both = torch.cat([a, b])
    torch.testing.assert_close(mean, both.mean(dim=0))
    torch.testing.assert_close(maximum, both.amax(dim=0))
    assert not torch.allclose(mean, (a.mean(0) + b.mean(0)) / 2)  # what averaging rank means would give


def test_merging_two_rank_states_gives_the_combined_batch():
    # merge_state applies each state's dist_reduce_fx, as the DDP sync does
    a, b = torch.randn(2), torch.randn(6)
    rank0, rank1 = PerSampleMeanMax(), PerSampleMeanMax()
    rank0.update(a)
    rank1.update(b)
    rank0.merge_state(rank1)
    mean, maximum = rank0.compute()
    assert float(mean) == pytest.approx(float(torch.cat([a, b]).mean()), rel=1e-6)
    assert float(maximum) == float(torch.cat([a, b]).max())


def test_errors():
    with pytest.raises(ValueError, match="`num_values` must be an integer >= 1, got 0"):
        PerSampleMeanMax(num_values=0)
    with pytest.raises(ValueError, match=r"`values` must have shape \(B, 2\).*got \(3,\)"):
        PerSampleMeanMax(num_values=2).update(torch.ones(3))
    with pytest.raises(TypeError, match=r"`values` must be a torch\.Tensor, got list"):
        PerSampleMeanMax().update([1.0])


def test_reduce_is_update_compute_reset_in_one_call():
    values, earlier = torch.randn(6, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    metric = PerSampleMeanMax(num_values=3)
    mean, maximum = metric.reduce(values)
    torch.testing.assert_close(mean, values.mean(0))
    torch.testing.assert_close(maximum, values.amax(0))
    assert mean.dtype == torch.float64  # values keep their dtype
    assert metric.update_count == 0 and metric.values == []  # left empty
    metric.update(earlier)  # an earlier update is part of the reduction, then gone
    mean, maximum = metric.reduce(values)
    torch.testing.assert_close(mean, torch.cat([earlier, values]).mean(0))
    assert metric.update_count == 0 and metric.values == []
    mean, maximum = metric.reduce(values[:0])  # no samples
    assert torch.isnan(mean).all() and torch.isneginf(maximum).all()
    with pytest.raises(ValueError, match=r"`values` must have shape \(B, 3\)"):
        metric.reduce(torch.ones(4))
