import pytest
import torch

from cim_models.objectives import (
    revdet_labels,
    revdet_loss,
    sliding_window_normalize,
    window_statistics,
)


def _brute_force_target(images: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """ResPix's target pixel by pixel in float64: window p - (k-1)//2 .. p + k//2 clipped to the
    image, mean and biased variance over all its pixels and channels."""
    x = images.double()
    before, after = (k - 1) // 2, k // 2
    out = torch.empty_like(x)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            top, left = max(i - before, 0), max(j - before, 0)
            window = x[:, :, top : i + after + 1, left : j + after + 1].flatten(1)
            mean, var = window.mean(1), window.var(1, unbiased=False)
            out[:, :, i, j] = (x[:, :, i, j] - mean[:, None]) / torch.sqrt(var[:, None] + eps)
    return out


def _eight_bit(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round() / 255


@pytest.mark.parametrize("window_size", [16, 5])
def test_sliding_window_target_equals_a_float64_brute_force_on_random_images(window_size):
    torch.manual_seed(0)
    images = _eight_bit(torch.rand(2, 3, 21, 19))  # odd sizes: borders on every side
    expected = _brute_force_target(images, window_size)
    target = sliding_window_normalize(images, window_size)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.double(), expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_target_is_exact_on_flat_eight_bit_regions():
    # A flat region with a few pixels one 8-bit level brighter: the true variance (~1e-8) is far
    # below eps, so E[x^2] - E[x]^2 in float32 (rounding error ~1e-7) was off by more than 1.
    torch.manual_seed(0)
    images = torch.full((1, 3, 40, 40), 178 / 255)
    images = _eight_bit(images + (torch.rand(1, 3, 40, 40) < 0.01) / 255)
    expected = _brute_force_target(images, 16)
    assert expected.abs().max() > 1  # the odd pixels stand out in the target
    torch.testing.assert_close(
        sliding_window_normalize(images, 16).double(), expected, atol=1e-4, rtol=0
    )
    _, var = window_statistics(images, 16)
    assert var.max() < 1e-6


def test_window_is_p_minus_7_to_p_plus_8_for_even_sizes():
    # One bright pixel at column 20 is inside the window of columns 12..27 only (20 - 8 .. 20 + 7).
    images = torch.zeros(1, 3, 1, 40)
    images[..., 20] = 1.0
    mean, _ = window_statistics(images, 16)
    inside = (mean[0, 0, 0] > 0).nonzero().squeeze(1)
    assert inside.tolist() == list(range(12, 28))


def test_window_statistics_are_joint_over_channels():
    # Each channel constant, channels different: the window's values are {0.2, 0.5, 0.8}.
    images = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    mean, var = window_statistics(images, 4)
    torch.testing.assert_close(mean, torch.full_like(mean, 0.5))
    torch.testing.assert_close(var, torch.full_like(var, 0.06))  # biased: ((0.3)^2 * 2) / 3


def test_sliding_window_target_has_zero_mean_unit_variance_per_window():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64) * 0.5 + torch.linspace(0, 0.5, 64)  # a gradient plus noise
    target = sliding_window_normalize(images, window_size=16)
    assert target.shape == images.shape
    windows = target[:, :, 8:56, 8:56].unfold(2, 16, 16).unfold(3, 16, 16)  # (B, C, 3, 3, 16, 16)
    windows = windows.permute(0, 2, 3, 1, 4, 5).flatten(3)
    assert windows.mean(-1).abs().max() < 0.15
    assert (windows.var(-1) - 1).abs().max() < 0.2


def test_sliding_window_is_local_and_same_size():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 48, 48)
    brighter = images.clone()
    brighter[..., :16, :16] += 5.0
    a, b = sliding_window_normalize(images, 8), sliding_window_normalize(brighter, 8)
    assert torch.allclose(a[..., 32:, 32:], b[..., 32:, 32:])  # far from the change: untouched


def test_sliding_window_borders_average_only_inside_pixels():
    # On a constant image, counting the zero padding would make border pixels look brighter than
    # their window.
    images = torch.full((1, 3, 32, 32), 0.7)
    target = sliding_window_normalize(images, 16)
    assert torch.isfinite(target).all()
    assert target.abs().max() < 1e-2


def test_constant_image_gives_finite_target():
    target = sliding_window_normalize(torch.ones(2, 3, 16, 16), 16)
    assert torch.isfinite(target).all() and target.abs().max() == 0


def test_revdet_labels_follow_the_electra_rule():
    input_ids = torch.tensor([[[1, 2], [3, 4]]])
    corrupted = torch.tensor([[[1, 9], [3, 8]]])
    mask = torch.tensor([[[True, True], [False, True]]])
    labels = revdet_labels(input_ids, corrupted, mask)
    # masked but sampled back to the original -> 0; masked and changed -> 1; unmasked -> 0
    assert labels.tolist() == [[[False, True], [False, True]]]
    # an unmasked position never counts as replaced, even if its id differs
    assert not revdet_labels(input_ids, corrupted, torch.zeros_like(mask)).any()


def test_revdet_loss_is_per_token():
    labels = torch.tensor([[[True, False], [False, True]]])
    perfect = torch.where(labels, 20.0, -20.0)
    assert revdet_loss(perfect, labels) < 1e-6
    one_wrong = perfect.clone()
    one_wrong[0, 0, 1] = 20.0
    torch.testing.assert_close(
        revdet_loss(one_wrong, labels), torch.tensor(20.0 / 4), atol=1e-4, rtol=0
    )
