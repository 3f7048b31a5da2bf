import torch

from cim_models import CIMGenerator, sample_tokens


def _generator():
    torch.manual_seed(0)
    return CIMGenerator(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, vocab_size=64).eval()


def _patch_pixels(mask_row, grid=4, patch=16):
    """(64, 64) bool map of the pixels inside the masked patches of one (N,) mask."""
    return mask_row.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)


def test_generator_cannot_see_masked_patches():
    generator = _generator()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True
    mask[1, [2, 3, 9]] = True
    inside = torch.stack([_patch_pixels(m) for m in mask]).unsqueeze(1).expand_as(images)
    logits = generator(images, mask)

    changed_masked = torch.where(inside, torch.randn_like(images) * 10, images)
    torch.testing.assert_close(generator(changed_masked, mask), logits, atol=0, rtol=0)

    changed_visible = torch.where(inside, images, torch.randn_like(images))
    assert not torch.allclose(generator(changed_visible, mask), logits)


def test_generator_returns_logits_of_masked_positions_in_order():
    generator = _generator()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 1] = mask[1, 7] = mask[1, 8] = True
    logits = generator(torch.randn(2, 3, 64, 64), mask)
    assert logits.shape == (3, 64)


def test_sample_keeps_unmasked_ids_and_fills_masked_ones():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 64, (4, 4, 4))
    mask = torch.rand(4, 4, 4) < 0.4
    logits = torch.randn(int(mask.sum()), 64)
    corrupted = sample_tokens(logits, input_ids, mask)
    assert corrupted.shape == input_ids.shape and corrupted.dtype == input_ids.dtype
    assert torch.equal(corrupted[~mask], input_ids[~mask])
    # A peaked distribution at masked positions must be what lands there.
    peaked = torch.full((int(mask.sum()), 64), -1e4)
    peaked[:, 13] = 0
    assert (sample_tokens(peaked, input_ids, mask)[mask] == 13).all()


def test_sampling_draws_different_tokens_per_sample():
    torch.manual_seed(0)
    input_ids = torch.zeros(8, 4, 4, dtype=torch.long)
    mask = torch.ones(8, 4, 4, dtype=torch.bool)
    same_logits = torch.zeros(1, 16, 64).expand(8, 16, 64)  # identical uniform distributions
    corrupted = sample_tokens(same_logits, input_ids, mask).flatten(1)
    assert len({tuple(row.tolist()) for row in corrupted}) == 8


def test_sampling_follows_softmax_and_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    ids = torch.zeros(20000, 1, 1, dtype=torch.long)
    mask = torch.ones(20000, 1, 1, dtype=torch.bool)
    draws = sample_tokens(logits, ids, mask, temperature=1.0).flatten()
    frequencies = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], 0), atol=0.015, rtol=0)
    hot = sample_tokens(logits, ids, mask, temperature=2.0).flatten()
    assert torch.bincount(hot, minlength=3)[2] < torch.bincount(draws, minlength=3)[2]
    for temperature in (0.0, 1e-6):
        assert (sample_tokens(logits, ids, mask, temperature=temperature) == 2).all()


def test_static_shape_path_matches_boolean_indexing():
    from cim_models.masking import masked_indices

    generator = _generator()
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for row, cols in enumerate(([0, 5, 9], [1, 2, 3], [13, 14, 15])):
        mask[row, cols] = True
    images = torch.randn(3, 3, 64, 64)
    index = masked_indices(mask, 3)
    gathered = generator(images, mask, index)
    assert gathered.shape == (3, 3, 64)
    torch.testing.assert_close(gathered.flatten(0, 1), generator(images, mask))
    ids = torch.randint(0, 64, (3, 4, 4))
    torch.manual_seed(0)
    a = sample_tokens(gathered, ids, mask, masked_index=index)
    torch.manual_seed(0)
    b = sample_tokens(gathered.flatten(0, 1), ids, mask)
    assert torch.equal(a, b)
