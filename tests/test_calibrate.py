"""Threshold calibration: bisection hits the target mean patch size; counts checked by hand."""

import math

import pytest
import torch

from blt_ext.calibrate import calibrate, find_threshold, format_histogram, patch_size_histogram


@pytest.fixture
def entropies(generator):
    return 3 * torch.rand(32, 200, generator=generator)


def patches_by_hand(entropies, threshold):
    """Global rule over rows of bytes: positions 0 and 1 start, p >= 2 starts iff H[p-1] > threshold
    (compared in fp32)."""
    t = torch.tensor(threshold, dtype=torch.float32)
    return entropies.shape[0] * 2 + int((entropies[:, 1:-1] > t).sum())


@pytest.mark.parametrize("target", [1.5, 4.5, 9.0])
def test_found_threshold_gives_the_target_mean_patch_size(entropies, target):
    cal = find_threshold(entropies, target, tolerance=0.005)
    assert cal.mean_patch_size == pytest.approx(target, rel=0.005)
    assert cal.num_patches == patches_by_hand(entropies, cal.threshold)
    assert cal.mean_patch_size == cal.num_bytes / cal.num_patches
    assert cal.num_bytes == entropies.numel()
    # the histogram describes exactly these patches
    assert sum(cal.histogram.values()) == cal.num_patches
    assert sum(n * c for n, c in cal.histogram.items()) == cal.num_bytes


def test_higher_targets_need_higher_thresholds(entropies):
    thresholds = [find_threshold(entropies, t).threshold for t in (2.0, 3.0, 5.0, 8.0)]
    assert thresholds == sorted(thresholds)


@pytest.mark.parametrize("rules", [{"monotonicity": True}, {"threshold_add": 0.2}, {"max_patch_length": 6}])
def test_relative_rules_and_max_length_are_calibrated_too(entropies, rules):
    cal = find_threshold(entropies, 3.0, **rules)
    assert cal.mean_patch_size == pytest.approx(3.0, rel=0.01)
    if "max_patch_length" in rules:
        assert max(cal.histogram) <= 6


def test_unreachable_target_is_refused(entropies):
    with pytest.raises(ValueError, match=r"target 150.0 is outside the mean patch sizes these entropies reach"):
        find_threshold(entropies, 150.0)
    with pytest.raises(ValueError, match="max_patch_length 4"):
        find_threshold(entropies, 6.0, max_patch_length=4)
    with pytest.raises(ValueError, match="target must be a finite number >= 1"):
        find_threshold(entropies, 0.5)
    with pytest.raises(ValueError, match=r"entropies must be \[N, T\]"):
        find_threshold(entropies[0], 2.0)


class UniformOverPrefix(torch.nn.Module):
    """A synthetic entropy model: after token t it is uniform over the first m(t) ids, so its
    entropy there is exactly log m(t)."""

    def __init__(self, sizes):
        super().__init__()
        self.register_buffer("sizes", sizes)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, tokens):
        m = self.sizes[tokens]
        ids = torch.arange(260)
        return torch.where(ids < m.unsqueeze(-1), 0.0, float("-inf")) + self.anchor


def test_calibrate_runs_the_entropy_model_once_and_bisects(generator):
    sizes = torch.randint(1, 200, (260,), generator=generator)
    model = UniformOverPrefix(sizes)
    rows = torch.randint(4, 260, (16, 128), generator=generator)
    cal = calibrate(model, rows, 3.5, batch_size=5)
    assert cal.mean_patch_size == pytest.approx(3.5, rel=0.01)
    expected = torch.log(sizes[rows].double()).float()
    assert cal.num_patches == patches_by_hand(expected, cal.threshold)
    # the threshold sits between two of the entropy levels log m
    levels = sorted({math.log(int(m)) for m in sizes[rows].flatten()})
    assert levels[0] <= cal.threshold <= levels[-1]


def test_histogram_text():
    hist = patch_size_histogram(torch.tensor([[1, 3, 3, 0], [1, 20, 2, 1]]))
    assert hist == {1: 3, 2: 1, 3: 2, 20: 1}
    text = format_histogram(hist, width=10).splitlines()
    assert text[0].split() == ["size", "patches", "share", "bytes"]
    rows = {line.split()[0]: line.split() for line in text[1:]}
    assert rows["1"][1] == "3" and rows["1"][2] == "42.9%"
    assert rows["17-32"][1] == "1" and rows["17-32"][3] == f"{100 * 20 / 31:.1f}%"
    assert "33-64" not in rows  # nothing beyond the largest patch
    assert rows["1"][-1] == "#" * 10
