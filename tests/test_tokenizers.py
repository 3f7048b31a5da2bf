import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cim_models.tokenizers import (
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
    loaded = create_tokenizer("dall-e", weights=str(tmp_path), n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), source.encode(images))


def test_dall_e_refuses_pickles_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        DallETokenizer(weights=str(tmp_path / "encoder.pkl"))
    with pytest.raises(FileNotFoundError, match="decoder.safetensors"):
        save_file(DallETokenizer(**TINY_DALL_E).encoder.state_dict(), tmp_path / "encoder.safetensors")
        DallETokenizer(weights=str(tmp_path), n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32)


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
    assert torch.equal(tokenizer.encode(decoded), ids)  # decoding paints exactly the quantised colour
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
