import pytest
import torch

from ecar.layout import StageLayout
from ecar.presets import get_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("grids, patch", [((4, 8, 16), 1), ((4, 8, 16), 2), ((2, 4, 8, 16, 32), 2), ((1, 2), 1)])
def test_offsets_and_mask_match_a_brute_force_construction(grids, patch):
    layout = StageLayout(grids=grids, patch_size=patch)
    stage_of = []
    for s, g in enumerate(grids):
        stage_of += [s] * (g // patch) ** 2
    assert layout.total_tokens == len(stage_of)
    for s in range(len(grids)):
        assert layout.offsets[s] == stage_of.index(s)
        assert layout.token_counts[s] == stage_of.count(s)
    expected = torch.zeros(len(stage_of), len(stage_of), dtype=torch.bool)
    for i, si in enumerate(stage_of):
        for j, sj in enumerate(stage_of):
            expected[i, j] = sj <= si
    assert torch.equal(layout.block_causal_mask, expected)


def test_default_windows_follow_the_renoise_correction():
    layout = StageLayout(grids=(4, 8, 16))
    assert layout.starts == pytest.approx((0.0, 0.2, 0.5))
    assert layout.ends == pytest.approx((1 / 3, 2 / 3, 1.0))
    for end, next_start in zip(layout.ends, layout.starts[1:]):
        assert end == pytest.approx(2 * next_start / (1 + next_start))  # b_s = 2a/(1+a)


def test_windows_without_correction_and_full_window_and_custom_edges():
    uncorrected = StageLayout(grids=(4, 8, 16), renoise_correction=False)
    assert uncorrected.starts == pytest.approx((0, 1 / 3, 2 / 3))
    assert uncorrected.ends == pytest.approx((1 / 3, 2 / 3, 1))
    assert StageLayout(grids=(4, 8, 16), full_window=True).windows == ((0.0, 1.0),) * 3
    custom = StageLayout(grids=(4, 8, 16), window_edges=(0.0, 0.5, 0.8, 1.0))
    assert custom.ends == (0.5, 0.8, 1.0)
    assert custom.starts == pytest.approx((0.0, 0.5 / 1.5, 0.8 / 1.2))


def test_layout_from_config_uses_patch_size():
    layout = StageLayout.from_config(get_config("ecar-fmnist"))
    assert layout.token_grids == (2, 4, 8)
    assert layout.token_counts == (4, 16, 64)
