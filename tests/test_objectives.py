import torch

from cim_models.objectives import revdet_labels, revdet_loss, sliding_window_normalize


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
    # On a constant image, counting the zero padding would make border pixels look brighter than their window.
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
    torch.testing.assert_close(revdet_loss(one_wrong, labels), torch.tensor(20.0 / 4), atol=1e-4, rtol=0)
