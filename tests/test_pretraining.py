import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cim_models import CIMConfig, CIMForPreTraining, pretraining, sample_tokens
from cim_models.masking import masked_indices
from cim_models.objectives import sliding_window_normalize
from cim_models.tokenizers import PaletteTokenizer, unmap_pixels
from tests.tiny import tiny_batch, tiny_config

COMBINATIONS = [
    (objective, enhancer) for objective in ("respix", "revdet") for enhancer in ("vit", "resnet")
]
# A ResNet-50 with one block per stage still ends 2048 channels wide; a narrow one trains 7x faster.
NARROW_RESNET = dict(enhancer_kwargs=dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128)))


def _narrow(enhancer: str) -> dict:
    return NARROW_RESNET if enhancer == "resnet" else {}


@pytest.mark.parametrize("objective,enhancer", COMBINATIONS)
def test_loss_goes_down_on_a_fixed_batch(make_tiny_model, objective, enhancer):
    model = make_tiny_model(objective, enhancer, **_narrow(enhancer))
    batch = tiny_batch(model, batch_size=8)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    torch.manual_seed(0)
    first = model(**batch)
    losses = []
    for _ in range(15):
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * first.loss.item()
    if objective == "respix":  # RevDet's labels move with the generator; ResPix's target is fixed
        assert output.enhancer_loss.item() < first.enhancer_loss.item()


@pytest.mark.parametrize("objective,enhancer", COMBINATIONS)
def test_output_fields(make_tiny_model, objective, enhancer):
    model = make_tiny_model(objective, enhancer, **_narrow(enhancer))
    output = model(**tiny_batch(model))
    torch.testing.assert_close(
        output.loss,
        output.generator_loss + model.config.enhancer_loss_weight * output.enhancer_loss,
    )
    assert output.corrupted_pixel_values.shape == (4, 3, 64, 64)
    assert 0 <= output.generator_accuracy <= 1 and 0 <= output.replaced_fraction <= 1
    expected = (4, 3, 64, 64) if objective == "respix" else (4, 4, 4)
    assert output.logits.shape == expected
    assert (output.revdet_accuracy is None) == (objective == "respix")


def test_unmasked_tokens_survive_and_replaced_mask_matches_masked_changes(make_tiny_model):
    model = make_tiny_model("revdet")
    batch = tiny_batch(model)
    output = model(**batch)
    assert not output.replaced_mask[~batch["bool_masked_pos"]].any()
    # Only masked tokens can change: re-encoding the corrupted image at unmasked cells gives the
    # originals, since the palette decoder paints each cell independently.
    original_ids = model.tokenizer.encode(batch["tokenizer_pixel_values"])
    reencoded = model.tokenizer.encode(
        torch.nn.functional.interpolate(output.corrupted_pixel_values, size=32, mode="area")
    )
    unmasked = ~batch["bool_masked_pos"]
    assert torch.equal(reencoded[unmasked], original_ids[unmasked])


def test_masks_and_samples_differ_per_sample(make_tiny_model):
    model = make_tiny_model("revdet")
    batch = tiny_batch(model, batch_size=6)
    masks = batch["bool_masked_pos"].flatten(1)
    assert len({tuple(m.tolist()) for m in masks}) > 1
    same = tiny_batch(model, batch_size=1)
    same = {k: v.expand(6, *v.shape[1:]) for k, v in same.items()}
    corrupted = model(**same).corrupted_pixel_values
    assert not torch.equal(corrupted[0], corrupted[1])  # same image and mask, own draws


def test_dall_e_corruption_is_sigmoid_then_unmap_of_the_decoder(make_tiny_model):
    model = make_tiny_model("respix", tokenizer="dall-e", sampling_temperature=0.0)
    batch = tiny_batch(model)
    output = model(**batch)
    # With temperature 0 the corrupted grid is deterministic: rebuild the decoder's image by hand.
    mask = batch["bool_masked_pos"].flatten(1)
    ids = model.tokenizer.encode(batch["tokenizer_pixel_values"]).flatten(1)
    logits = model.generator(batch["pixel_values"], mask, masked_indices(mask, 6))
    ids[mask] = logits.argmax(-1).flatten()
    one_hot = torch.nn.functional.one_hot(ids.view(4, 4, 4), 512).permute(0, 3, 1, 2).float()
    decoded = unmap_pixels(torch.sigmoid(model.tokenizer.decoder(one_hot)[:, :3]))
    expected = torch.nn.functional.interpolate(
        decoded, size=64, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(
        output.corrupted_pixel_values, expected.clamp(0, 1), atol=1e-5, rtol=0
    )


def _step_from_the_parts(model, batch):
    """The CIM step written out from the model's parts (tokenizer, generator, decoder, enhancer,
    head), as the paper describes it: what forward's stage methods must add up to."""
    config = model.config
    mask = batch["bool_masked_pos"].flatten(1)  # (B, N)
    index = masked_indices(mask, config.num_mask_patches)
    ids = model.tokenizer.encode(batch["tokenizer_pixel_values"])  # (B, h, w)
    logits = model.generator(batch["pixel_values"], mask, index)  # (B, M, V)
    masked_ids = ids.flatten(1).gather(1, index)
    generator_loss = F.cross_entropy(logits.flatten(0, 1), masked_ids.flatten())
    corrupted_ids = sample_tokens(logits, ids, index, config.sampling_temperature)
    decoded = model.tokenizer.decode(corrupted_ids)
    corrupted = F.interpolate(decoded, size=config.image_size, mode="bilinear", align_corners=False)
    corrupted = corrupted.clamp(0, 1)
    features = model.enhancer.forward_features((corrupted - model.image_mean) / model.image_std)
    prediction = model.enhancer_head(features)
    replaced = (corrupted_ids != ids) & mask.view_as(ids)
    if config.objective == "respix":
        original = batch["pixel_values"] * model.image_std + model.image_mean
        target = sliding_window_normalize(original, config.window_size)
        enhancer_loss = F.mse_loss(prediction, target)
    else:
        prediction = prediction.squeeze(1)
        enhancer_loss = F.binary_cross_entropy_with_logits(prediction, replaced.float())
    return dict(
        generator_loss=generator_loss,
        enhancer_loss=enhancer_loss,
        loss=generator_loss + config.enhancer_loss_weight * enhancer_loss,
        logits=prediction,
        corrupted_pixel_values=corrupted,
        replaced_mask=replaced,
    )


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_forward_is_the_stages_in_order_and_equals_the_parts(make_tiny_model, objective):
    # Same seed, same numbers: splitting the step into methods changed nothing. Temperature 1 makes
    # the sampler draw, so the order of the random draws is pinned too.
    model = make_tiny_model(objective, tokenizer="dall-e").train()
    batch = tiny_batch(model)
    torch.manual_seed(1)
    output = model(**batch)
    torch.manual_seed(1)
    expected = _step_from_the_parts(model, batch)
    for key, value in expected.items():
        torch.testing.assert_close(output[key], value, rtol=0, atol=0, msg=key)
    assert output.replaced_mask.any()  # the sampler did replace tokens


def test_forward_calls_the_stage_methods(make_tiny_model):
    # Each stage is a method forward looks up on the model, so one can be swapped or timed alone.
    model = make_tiny_model("revdet")
    batch = tiny_batch(model)
    model.corrupt = lambda ids: torch.zeros(ids.shape[0], 3, 64, 64)
    output = model(**batch)
    assert torch.equal(output.corrupted_pixel_values, torch.zeros(4, 3, 64, 64))
    model.sample = lambda logits, ids, index: ids
    assert not model(**batch).replaced_mask.any()


@pytest.mark.parametrize("objective", ["respix", "revdet"])
def test_no_gradient_reaches_generator_from_enhancer_or_tokenizer_at_all(
    make_tiny_model, objective
):
    model = make_tiny_model(objective, tokenizer="dall-e")
    output = model(**tiny_batch(model))
    output.enhancer_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.enhancer.parameters())
    assert all(p.grad is None for p in model.tokenizer.parameters())
    assert not any(p.requires_grad for p in model.tokenizer.parameters())


def test_generator_loss_trains_only_the_generator(make_tiny_model):
    model = make_tiny_model("respix")
    output = model(**tiny_batch(model))
    output.generator_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.enhancer.parameters())


def test_save_and_from_pretrained_round_trip_without_tokenizer_weights(make_tiny_model, tmp_path):
    model = make_tiny_model("revdet", tokenizer="dall-e")
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith("tokenizer.") for k in saved)
    assert any(k.startswith("generator.") for k in saved) and any(
        k.startswith("enhancer.") for k in saved
    )
    reloaded = CIMForPreTraining.from_pretrained(tmp_path).eval()
    model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    torch.testing.assert_close(reloaded.image_std, model.image_std)
    batch = tiny_batch(model)
    torch.manual_seed(1)
    a = model(**batch)
    torch.manual_seed(1)
    b = reloaded(**batch)
    torch.testing.assert_close(a.loss, b.loss)


def test_tokenizer_weights_saved_when_asked(make_tiny_model, tmp_path):
    model = make_tiny_model(tokenizer="dall-e", save_tokenizer_weights=True)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(
        saved["tokenizer.encoder.blocks.input.w"], model.tokenizer.encoder.blocks.input.w
    )
    reloaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(
        reloaded.tokenizer.encoder.blocks.input.w, model.tokenizer.encoder.blocks.input.w
    )
    assert not any(p.requires_grad for p in reloaded.tokenizer.parameters())


class _FittedPalette(PaletteTokenizer):
    """Stand-in for a data-fitted tokenizer: its colour table comes from ``fit``, so no source can
    rebuild it and it must travel in the model's checkpoint."""

    weights_in_checkpoint = True

    def __init__(self, cell_size: int = 8, levels: int = 8):
        super().__init__(cell_size, levels)
        self.register_buffer("table", torch.zeros(self.vocab_size, 3))  # (V, RGB)
        self.gain = torch.nn.Parameter(torch.ones(()))  # a parameter too, which must stay frozen
        self.freeze()

    def fit(self, seed: int) -> "_FittedPalette":
        self.table.copy_(
            torch.rand(self.table.shape, generator=torch.Generator().manual_seed(seed))
        )
        return self

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        cells = (self.table[ids.long()] * self.gain).permute(0, 3, 1, 2)  # (B, 3, h, w)
        return cells.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)


@pytest.fixture
def build_tokenizer_as_fitted_palette(monkeypatch):
    """from_pretrained builds the tokenizer from the config (on the meta device): make that the
    stand-in, unfitted."""
    monkeypatch.setattr(
        pretraining, "create_tokenizer", lambda name, weights=None, **kw: _FittedPalette(**kw)
    )


def test_fitted_tokenizer_weights_travel_in_the_checkpoint(
    tmp_path, build_tokenizer_as_fitted_palette
):
    torch.manual_seed(0)
    model = CIMForPreTraining(tiny_config("revdet"), tokenizer=_FittedPalette().fit(seed=3))
    assert not model.config.save_tokenizer_weights and model.saves_tokenizer_weights
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["tokenizer.table"], model.tokenizer.table)

    reloaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(reloaded.tokenizer.table, model.tokenizer.table)
    assert reloaded.tokenizer.table.abs().sum() > 0  # the fitted table, not a fresh one
    assert not any(p.requires_grad for p in reloaded.tokenizer.parameters())
    assert not reloaded.tokenizer.training
    batch = tiny_batch(model)
    torch.manual_seed(1)
    expected = model(**batch).corrupted_pixel_values
    torch.manual_seed(1)
    torch.testing.assert_close(reloaded(**batch).corrupted_pixel_values, expected, rtol=0, atol=0)


def test_fitted_tokenizer_missing_from_the_checkpoint_is_a_clear_error(
    tmp_path, build_tokenizer_as_fitted_palette
):
    # A checkpoint of the weightless palette has no tokenizer.* tensors.
    CIMForPreTraining(tiny_config("revdet"), tokenizer=PaletteTokenizer()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.* weights.*exist only in checkpoints"):
        CIMForPreTraining.from_pretrained(tmp_path)


def test_codebook_tokenizer_reloads_from_the_checkpoint(tmp_path):
    codebook = pytest.importorskip("cim_models.tokenizers.codebook")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokenizer = codebook.CodebookTokenizer(vocab_size=16, cell_size=8)
    tokenizer.fit(images, num_iterations=2, progress=False)
    kwargs = dict(vocab_size=16, cell_size=8)
    model = CIMForPreTraining(
        tiny_config("revdet", tokenizer="codebook", tokenizer_kwargs=kwargs), tokenizer=tokenizer
    )
    model.save_pretrained(tmp_path)
    reloaded = CIMForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(reloaded.tokenizer.centroids, tokenizer.centroids)
    assert not any(p.requires_grad for p in reloaded.tokenizer.parameters())
    assert torch.equal(reloaded.tokenizer.encode(images), tokenizer.encode(images))


def test_tokenizer_stays_out_of_trainable_parameters(make_tiny_model):
    model = make_tiny_model(tokenizer="dall-e")
    model.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in model.tokenizer.parameters()}
    assert not model.tokenizer.training


def test_generator_width_follows_the_enhancer(make_tiny_model):
    model = make_tiny_model(
        "respix", generator_hidden_size=None, generator_num_attention_heads=None
    )
    assert model.config.generator_hidden_size == 64 == model.generator.embed_dim
    assert model.config.generator_num_attention_heads == 1


def test_bad_inputs_get_clear_errors(make_tiny_model):
    model = make_tiny_model()
    batch = tiny_batch(model)
    with pytest.raises(ValueError, match="image_size is 64"):
        model(**{**batch, "pixel_values": torch.randn(4, 3, 96, 96)})
    with pytest.raises(ValueError, match="grayscale"):
        model(**{**batch, "pixel_values": torch.randn(4, 1, 64, 64)})
    with pytest.raises(ValueError, match=r"tokenizer_pixel_values must be \(B, 3, 32, 32\)"):
        model(**{**batch, "tokenizer_pixel_values": torch.rand(4, 3, 64, 64)})
    with pytest.raises(ValueError, match="bool_masked_pos"):
        model(**{**batch, "bool_masked_pos": torch.zeros(4, 5, 5, dtype=torch.bool)})
    with pytest.raises(RuntimeError, match="exactly num_mask_patches=6"):
        model(**{**batch, "bool_masked_pos": torch.ones(4, 4, 4, dtype=torch.bool)})


def test_bad_configs_get_clear_errors():
    with pytest.raises(ValueError, match="Unknown objective 'mae'"):
        CIMConfig(objective="mae")
    with pytest.raises(ValueError, match="Unknown enhancer 'not_a_model'"):
        CIMForPreTraining(CIMConfig(enhancer="not_a_model", tokenizer="palette"))
    with pytest.raises(ValueError, match="num_mask_patches"):
        CIMConfig(image_size=64, num_mask_patches=20)
    with pytest.raises(ValueError, match="token grid"):
        CIMForPreTraining(
            tiny_config(
                "revdet", enhancer_kwargs=dict(depth=1, embed_dim=32, num_heads=1, patch_size=8)
            )
        )


@pytest.mark.parametrize("enhancer", ["vit", "resnet"])
def test_activation_checkpointing_changes_neither_loss_nor_gradients(make_tiny_model, enhancer):
    model = make_tiny_model("respix", enhancer, **_narrow(enhancer))
    batch = tiny_batch(model)

    def loss_and_grads():
        torch.manual_seed(0)
        output = model(**batch)
        output.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return output.loss.detach(), grads

    plain_loss, plain_grads = loss_and_grads()
    model.activation_checkpointing_enable()
    assert model.generator.grad_checkpointing and model.enhancer.grad_checkpointing
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
