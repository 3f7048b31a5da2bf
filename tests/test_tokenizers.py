import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cim_models.tokenizers import (
    CodebookTokenizer,
    DallETokenizer,
    PaletteTokenizer,
    create_tokenizer,
    map_pixels,
    unmap_pixels,
)
from tests.tiny import TINY_DALL_E


def test_dall_e_matches_openai_layout_and_size():
    tokenizer = DallETokenizer(random_init=True)
    encoder, decoder = tokenizer.encoder.state_dict(), tokenizer.decoder.state_dict()
    assert sum(v.numel() for v in encoder.values()) == 53_786_240
    assert sum(v.numel() for v in decoder.values()) == 43_829_766
    assert (len(encoder), len(decoder)) == (74, 76)
    assert encoder["blocks.input.w"].shape == (256, 3, 7, 7)
    assert encoder["blocks.group_2.block_1.id_path.w"].shape == (512, 256, 1, 1)
    assert encoder["blocks.group_1.block_1.res_path.conv_1.w"].shape == (64, 256, 3, 3)
    assert encoder["blocks.output.conv.w"].shape == (8192, 2048, 1, 1)
    assert decoder["blocks.input.w"].shape == (128, 8192, 1, 1)
    assert decoder["blocks.output.conv.w"].shape == (6, 256, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" in decoder  # 128 -> 2048 channels needs a projection


def test_dall_e_decode_by_embedding_matches_one_hot_reference():
    tokenizer = DallETokenizer(**TINY_DALL_E, seed=1)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 4, 4))
    one_hot = F.one_hot(ids, tokenizer.vocab_size).permute(0, 3, 1, 2).float()
    stats = tokenizer.decoder(one_hot)  # the reference path: OpenAI's decoder input
    expected = unmap_pixels(torch.sigmoid(stats[:, :3]))
    decoded = tokenizer.decode(ids)
    assert decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_dall_e_encode_is_argmax_of_mapped_pixels():
    tokenizer = DallETokenizer(**TINY_DALL_E)
    images = torch.rand(2, 3, 32, 32)
    ids = tokenizer.encode(images)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.int64
    assert torch.equal(ids, tokenizer.encoder(map_pixels(images)).argmax(1))
    assert not torch.equal(ids, tokenizer.encoder(images).argmax(1))  # map_pixels really applied


def test_pixel_mapping_round_trip_and_range():
    x = torch.rand(2, 3, 8, 8)
    mapped = map_pixels(x)
    assert mapped.min() >= 0.1 and mapped.max() <= 0.9
    torch.testing.assert_close(unmap_pixels(mapped), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("name", ["dall-e", "palette"])
def test_tokenizer_is_frozen_and_train_cannot_unfreeze_it(name):
    tokenizer = create_tokenizer(name, **(TINY_DALL_E if name == "dall-e" else {}))
    tokenizer.train()
    assert not tokenizer.training
    assert not any(p.requires_grad for p in tokenizer.parameters())
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    assert not tokenizer.decode(tokenizer.encode(images)).requires_grad


def test_dall_e_without_weights_refuses_to_run():
    tokenizer = DallETokenizer(n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32)
    with pytest.raises(RuntimeError, match="convert_dall_e.py"):
        tokenizer.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="random_init=True"):
        tokenizer.decode(torch.zeros(1, 4, 4, dtype=torch.long))


def test_dall_e_loads_safetensors_folder(tmp_path):
    source = DallETokenizer(**TINY_DALL_E, seed=7)
    save_file(source.encoder.state_dict(), tmp_path / "encoder.safetensors")
    save_file(source.decoder.state_dict(), tmp_path / "decoder.safetensors")
    loaded = create_tokenizer(
        "dall-e", weights=str(tmp_path), n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32
    )
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), source.encode(images))


def test_dall_e_refuses_pickles_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        DallETokenizer(weights=str(tmp_path / "encoder.pkl"))
    with pytest.raises(FileNotFoundError, match="decoder.safetensors"):
        save_file(
            DallETokenizer(**TINY_DALL_E).encoder.state_dict(), tmp_path / "encoder.safetensors"
        )
        DallETokenizer(
            weights=str(tmp_path), n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32
        )


def test_dall_e_hub_repo_offline_gives_clear_error():
    with pytest.raises(OSError, match="cim-models/no-such-dvae"):
        DallETokenizer(weights="cim-models/no-such-dvae")


@pytest.mark.parametrize("size", [(16, 16), (24, 40), (64, 64)])
def test_palette_round_trip_any_size_divisible_by_cell(size):
    tokenizer = PaletteTokenizer()
    images = torch.rand(3, 3, *size)
    ids = tokenizer.encode(images)
    assert ids.shape == (3, size[0] // 8, size[1] // 8)
    assert ids.max() < tokenizer.vocab_size == 512
    decoded = tokenizer.decode(ids)
    assert decoded.shape == images.shape
    assert torch.equal(
        tokenizer.encode(decoded), ids
    )  # decoding paints exactly the quantised colour
    cell_means = F.avg_pool2d(images, 8)
    assert (F.avg_pool2d(decoded, 8) - cell_means).abs().max() <= 0.5 / 7 + 1e-6


def test_tokenizers_reject_bad_input():
    tokenizer = PaletteTokenizer()
    with pytest.raises(ValueError, match="RGB"):
        tokenizer.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        tokenizer.encode(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="integer id grid"):
        tokenizer.decode(torch.rand(1, 2, 2))
    with pytest.raises(ValueError, match="Unknown tokenizer"):
        create_tokenizer("vqgan")


# ------------------------------------------------------------------------------------------------
# The k-means patch codebook


def _planted_images(num_images, patterns, cells=4, noise=0.0, seed=0):
    """Images tiled from a few fixed 8x8 patterns: images (N, 3, 8c, 8c), pattern ids (N, c, c)."""
    rng = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(patterns), (num_images, cells, cells), generator=rng)
    size = patterns.shape[-1]
    tiles = patterns[labels]  # (N, c, c, 3, 8, 8)
    images = tiles.permute(0, 3, 1, 4, 2, 5).reshape(num_images, 3, cells * size, cells * size)
    images = images + noise * torch.randn(images.shape, generator=rng)
    return images.clamp(0, 1), labels


_COLOUR_PAIRS = torch.tensor(
    [
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        [[0.9, 0.1, 0.1], [0.1, 0.2, 0.9]],
        [[0.2, 0.7, 0.2], [1.0, 1.0, 0.3]],
    ]
)


def _textured_images(num_images, size=32, seed=0):
    """Two-colour stripes of random period, phase and orientation: edges inside every cell."""
    rng = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(num_images):
        period = int(torch.randint(2, 6, (1,), generator=rng))
        phase = int(torch.randint(0, 2 * period, (1,), generator=rng))
        kind = int(torch.randint(0, 3, (1,), generator=rng))
        coordinate = (rows, cols, rows + cols)[kind] + phase
        mask = ((coordinate // period) % 2).float()  # (size, size) in {0, 1}
        colours = _COLOUR_PAIRS[int(torch.randint(len(_COLOUR_PAIRS), (1,), generator=rng))]
        images.append(colours[0].view(3, 1, 1) * mask + colours[1].view(3, 1, 1) * (1 - mask))
    return torch.stack(images)


@pytest.fixture(scope="module")
def textured_codebook():
    return CodebookTokenizer(vocab_size=128).fit(_textured_images(300), progress=False)


@pytest.mark.parametrize("vocab_size", [6, 9])
def test_codebook_recovers_planted_patches_exactly(vocab_size):
    patterns = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    images, _ = _planted_images(40, patterns)
    tokenizer = CodebookTokenizer(vocab_size=vocab_size).fit(images, progress=False)
    # More centroids than patterns: spare ones duplicate a pattern; the decode stays exact up to the
    # rounding of averaging identical patches.
    torch.testing.assert_close(
        tokenizer.decode(tokenizer.encode(images)), images, atol=1e-5, rtol=0
    )


def test_codebook_moves_empty_centroids_to_the_farthest_patches():
    # Two common patterns and two patches seen once: the k-means++ subsample (32 patches per
    # centroid) misses the rare ones, so two seeds duplicate common patterns and their clusters go
    # empty. Re-seeding them at the farthest patches must give the rare patches their own ids.
    patterns = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    images, _ = _planted_images(625, patterns[:2])  # 10,000 patches
    images[0, :, :8, :8], images[-1, :, -8:, -8:] = patterns[2], patterns[3]
    tokenizer = CodebookTokenizer(vocab_size=4).fit(images, num_iterations=3, progress=False)
    rare = torch.cat((images[:1], images[-1:]))
    ids = tokenizer.encode(rare)
    assert len(torch.unique(torch.stack((ids[0, 0, 0], ids[1, -1, -1], ids[0, 0, 1])))) == 3
    torch.testing.assert_close(tokenizer.decode(ids), rare, atol=1e-6, rtol=0)


def test_codebook_ids_follow_planted_patterns_under_noise():
    patterns = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    images, labels = _planted_images(40, patterns, noise=0.02)
    tokenizer = CodebookTokenizer(vocab_size=6).fit(images, progress=False)
    ids = tokenizer.encode(images)
    # One id per pattern and one pattern per id: the clustering is a relabelling of the truth.
    pairs = torch.unique(torch.stack((ids.flatten(), labels.flatten())), dim=1)
    assert pairs.shape[1] == 6 and len(pairs[0].unique()) == 6
    for token, label in pairs.t().tolist():  # each centroid is its pattern, up to averaged noise
        assert (tokenizer.centroids[token].view(3, 8, 8) - patterns[label]).abs().max() < 0.02


def test_codebook_fit_is_deterministic_given_seed():
    images = _textured_images(40, seed=3)
    first = CodebookTokenizer(vocab_size=32).fit(images, seed=0, progress=False)
    second = CodebookTokenizer(vocab_size=32).fit(images, seed=0, progress=False)
    other = CodebookTokenizer(vocab_size=32).fit(images, seed=1, progress=False)
    assert torch.equal(first.centroids, second.centroids)
    assert not torch.equal(first.centroids, other.centroids)
    assert first.fitted and first.weights_in_checkpoint


@pytest.mark.parametrize("size", [(16, 16), (24, 40), (64, 64)])
def test_codebook_encode_decode_shapes_and_ranges(textured_codebook, size):
    images = torch.rand(3, 3, *size)
    ids = textured_codebook.encode(images)
    assert ids.shape == (3, size[0] // 8, size[1] // 8) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < textured_codebook.vocab_size == 128
    decoded = textured_codebook.decode(ids)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert torch.equal(
        textured_codebook.encode(decoded), ids
    )  # a centroid is its own nearest centroid


def test_codebook_id_is_the_nearest_centroid(textured_codebook):
    images = torch.rand(2, 3, 16, 16)
    ids = textured_codebook.encode(images)
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(-1, 192)
    expected = torch.cdist(patches, textured_codebook.centroids).argmin(1)
    assert torch.equal(ids.flatten(), expected)


def test_codebook_keeps_edges_that_the_palette_flattens(textured_codebook):
    images = _textured_images(50, seed=4)  # held out from the fit
    palette = PaletteTokenizer()
    codebook_error = (
        (textured_codebook.decode(textured_codebook.encode(images)) - images).square().mean()
    )
    palette_error = (palette.decode(palette.encode(images)) - images).square().mean()
    assert codebook_error < 0.5 * palette_error

    def edges(x):  # mean absolute horizontal difference, inside and across cells
        return (x[..., 1:] - x[..., :-1]).abs().mean()

    assert edges(textured_codebook.decode(textured_codebook.encode(images))) > 0.5 * edges(images)
    assert edges(palette.decode(palette.encode(images))) < 0.25 * edges(images)


def test_codebook_state_dict_round_trips_through_safetensors(textured_codebook, tmp_path):
    save_file(textured_codebook.state_dict(), tmp_path / "codebook_state.safetensors")
    state = load_file(tmp_path / "codebook_state.safetensors")
    assert set(state) == {"centroids", "fitted"}
    loaded = CodebookTokenizer(vocab_size=128)
    loaded.load_state_dict(state)
    images = _textured_images(4, seed=5)
    assert torch.equal(loaded.encode(images), textured_codebook.encode(images))


def test_codebook_save_pretrained_loads_by_name(textured_codebook, tmp_path):
    small = CodebookTokenizer(vocab_size=16, cell_size=4).fit(_textured_images(8), progress=False)
    path = small.save_pretrained(tmp_path)
    images = _textured_images(4, seed=6)
    for weights in (str(tmp_path), path):
        loaded = create_tokenizer("codebook", weights=weights)  # sizes come from the file
        assert (loaded.vocab_size, loaded.downsample) == (16, 4)
        assert torch.equal(loaded.encode(images), small.encode(images))
    with pytest.raises(ValueError, match=r"expects \(64, 192\)"):
        create_tokenizer("codebook", weights=path, vocab_size=64, cell_size=8)


def test_codebook_builds_on_meta_and_loads_with_assign(textured_codebook):
    with torch.device("meta"):
        tokenizer = CodebookTokenizer(vocab_size=128)
    assert tokenizer.centroids.is_meta
    with pytest.raises(RuntimeError, match="meta device"):
        tokenizer.encode(torch.rand(1, 3, 16, 16))
    tokenizer.load_state_dict(textured_codebook.state_dict(), assign=True)
    images = _textured_images(4, seed=7)
    assert torch.equal(tokenizer.encode(images), textured_codebook.encode(images))
    tokenizer.train()
    assert not tokenizer.training and not list(tokenizer.parameters())


def test_unfitted_codebook_says_how_to_fit_it(tmp_path):
    tokenizer = create_tokenizer("codebook")
    with pytest.raises(RuntimeError, match=r"call tokenizer\.fit\(images\)"):
        tokenizer.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(RuntimeError, match="cim-pretrain"):
        tokenizer.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not been fitted"):
        tokenizer.save_pretrained(tmp_path)
    # Loading an unfitted state over a fitted one makes it unfitted again.
    tokenizer = CodebookTokenizer(vocab_size=16)
    fitted = CodebookTokenizer(vocab_size=16).fit(_textured_images(16), progress=False)
    fitted.load_state_dict(tokenizer.state_dict())
    with pytest.raises(RuntimeError, match="not been fitted"):
        fitted.encode(torch.rand(1, 3, 16, 16))


def test_codebook_rejects_bad_input(tmp_path):
    tokenizer = CodebookTokenizer(vocab_size=16)
    with pytest.raises(ValueError, match=r"\[0, 1\].*normalisation"):
        tokenizer.fit(torch.randn(4, 3, 16, 16), progress=False)
    with pytest.raises(ValueError, match="at least as many patches, got 8"):
        tokenizer.fit(torch.rand(2, 3, 16, 16), progress=False)
    with pytest.raises(ValueError, match="divisible by 8"):
        tokenizer.fit(torch.rand(4, 3, 20, 16), progress=False)
    with pytest.raises(ValueError, match="safetensors only"):
        CodebookTokenizer(weights=str(tmp_path / "codebook.pt"))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        CodebookTokenizer(weights=str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size=1"):
        CodebookTokenizer(vocab_size=1)


def test_only_the_codebook_needs_its_weights_in_the_checkpoint():
    assert CodebookTokenizer.weights_in_checkpoint
    assert not PaletteTokenizer.weights_in_checkpoint and not DallETokenizer.weights_in_checkpoint


def test_codebook_corrupts_images_in_a_pretraining_step(textured_codebook):
    from cim_models import CIMForPreTraining
    from tests.tiny import tiny_batch, tiny_config

    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_config(tokenizer="codebook"), tokenizer=textured_codebook)
    batch = tiny_batch(model)
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert model.config.vocab_size == 128
    assert not any(p.requires_grad for p in model.tokenizer.parameters())
