import pytest
import torch

from cim_models import CIMGenerator, sample_tokens
from cim_models.masking import masked_indices


def _generator():
    torch.manual_seed(0)
    return CIMGenerator(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, vocab_size=64
    ).eval()


def _patch_pixels(mask_row, grid=4, patch=16):
    """(64, 64) bool map of the pixels inside the masked patches of one (N,) mask."""
    return mask_row.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)


def _mask(*rows, num_patches=16):
    """(B, N) masks from lists of masked positions, one list per sample."""
    mask = torch.zeros(len(rows), num_patches, dtype=torch.bool)
    for row, cols in enumerate(rows):
        mask[row, cols] = True
    return mask


def test_generator_cannot_see_masked_patches():
    generator = _generator()
    images = torch.randn(2, 3, 64, 64)
    mask = _mask([0, 5, 6, 15], [2, 3, 9, 12])
    index = masked_indices(mask, 4)
    inside = torch.stack([_patch_pixels(m) for m in mask]).unsqueeze(1).expand_as(images)
    logits = generator(images, mask, index)

    changed_masked = torch.where(inside, torch.randn_like(images) * 10, images)
    torch.testing.assert_close(generator(changed_masked, mask, index), logits, atol=0, rtol=0)

    changed_visible = torch.where(inside, images, torch.randn_like(images))
    assert not torch.allclose(generator(changed_visible, mask, index), logits)


def test_generator_returns_logits_of_masked_positions_in_order():
    # The head runs on the gathered masked tokens only; row j of sample b is position index[b, j]
    # of the full token sequence.
    generator = _generator()
    mask = _mask([1, 7, 8], [0, 2, 15])
    index = masked_indices(mask, 3)
    images = torch.randn(2, 3, 64, 64)
    logits = generator(images, mask, index)
    assert logits.shape == (2, 3, 64)
    every_position = generator(images, mask, torch.arange(16).expand(2, 16))  # (B, N, V)
    torch.testing.assert_close(
        logits, every_position.gather(1, index[..., None].expand(-1, -1, 64))
    )
    assert index.tolist() == [[1, 7, 8], [0, 2, 15]]


def test_sample_keeps_unmasked_ids_and_fills_masked_ones():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 64, (4, 4, 4))
    mask = torch.stack([torch.randperm(16) < 6 for _ in range(4)])  # (B, N), 6 masked each
    index = masked_indices(mask, 6)
    corrupted = sample_tokens(torch.randn(4, 6, 64), input_ids, index)
    assert corrupted.shape == input_ids.shape and corrupted.dtype == input_ids.dtype
    unmasked = ~mask.view(4, 4, 4)
    assert torch.equal(corrupted[unmasked], input_ids[unmasked])
    # A peaked distribution at masked positions must be what lands there.
    peaked = torch.full((4, 6, 64), -1e4)
    peaked[..., 13] = 0
    assert (sample_tokens(peaked, input_ids, index)[~unmasked] == 13).all()


def test_sample_puts_each_draw_at_its_own_position():
    input_ids = torch.zeros(1, 2, 2, dtype=torch.long)
    index = torch.tensor([[1, 3]])
    logits = torch.full((1, 2, 8), -1e4)
    logits[0, 0, 5] = logits[0, 1, 7] = 0  # position 1 -> id 5, position 3 -> id 7
    assert sample_tokens(logits, input_ids, index).tolist() == [[[0, 5], [0, 7]]]


def test_sampling_draws_different_tokens_per_sample():
    torch.manual_seed(0)
    input_ids = torch.zeros(8, 4, 4, dtype=torch.long)
    index = torch.arange(16).expand(8, 16)
    same_logits = torch.zeros(1, 16, 64).expand(8, 16, 64)  # identical uniform distributions
    corrupted = sample_tokens(same_logits, input_ids, index).flatten(1)
    assert len({tuple(row.tolist()) for row in corrupted}) == 8


def test_sampling_follows_softmax_and_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(20000, 1, 3)
    ids = torch.zeros(20000, 1, 1, dtype=torch.long)
    index = torch.zeros(20000, 1, dtype=torch.long)
    draws = sample_tokens(logits, ids, index, temperature=1.0).flatten()
    frequencies = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(frequencies, torch.softmax(logits[0, 0], 0), atol=0.015, rtol=0)
    hot = sample_tokens(logits, ids, index, temperature=2.0).flatten()
    assert torch.bincount(hot, minlength=3)[2] < torch.bincount(draws, minlength=3)[2]
    for temperature in (0.0, 1e-6):
        assert (sample_tokens(logits, ids, index, temperature=temperature) == 2).all()


def test_sample_rejects_logits_that_do_not_match_the_index():
    index = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"masked_index of shape \(B, M\) = \(2, 3\)"):
        sample_tokens(torch.randn(6, 64), torch.zeros(2, 4, 4, dtype=torch.long), index)
