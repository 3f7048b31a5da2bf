"""CIMForPreTraining: the whole CIM step (Fang et al., ICLR 2023), one method per stage.

images -> tokens (frozen tokenizer) -> generator on the masked image -> sampled tokens -> corrupted
image (frozen decoder) -> enhancer -> ResPix or RevDet loss. Only the enhancer is kept afterwards.
``forward`` calls the stages in order; each stage is a method of its own, so it can be called, timed
or replaced alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .configuration_cim import CIMConfig
from .generator import CIMGenerator, sample_tokens
from .heads import create_head
from .masking import masked_indices
from .modeling_cim import CIMPreTrainedModel, create_enhancer
from .objectives import respix_loss, revdet_labels, revdet_loss, sliding_window_normalize
from .tokenizers import ImageTokenizer, create_tokenizer


@dataclass
class CIMForPreTrainingOutput(ModelOutput):
    """Outputs of one CIM step. Losses keep their graphs; metrics are 0-dim tensors on the model's
    device, so reading them is left to logging time (no host sync inside the step).

    Args:
        loss: `generator_loss + enhancer_loss_weight * enhancer_loss`.
        generator_loss: cross-entropy of the generator on the masked tokens.
        enhancer_loss: ResPix MSE or RevDet binary cross-entropy.
        generator_accuracy: top-1 accuracy of the generator on the masked tokens.
        replaced_fraction: fraction of masked tokens whose sample differs from the original.
        revdet_accuracy: RevDet only, accuracy of the replaced/kept decision over all tokens.
        logits: the enhancer's prediction: restored pixels (B, 3, H, W) in the sliding-window
            normalised space (ResPix) or replaced-token logits (B, h, w) (RevDet).
        corrupted_pixel_values: the corrupted image the enhancer saw, in [0, 1], (B, 3, H, W).
        replaced_mask: (B, h, w) bool, the tokens the sampler replaced (RevDet's labels).
    """

    loss: torch.Tensor | None = None
    generator_loss: torch.Tensor | None = None
    enhancer_loss: torch.Tensor | None = None
    generator_accuracy: torch.Tensor | None = None
    replaced_fraction: torch.Tensor | None = None
    revdet_accuracy: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    corrupted_pixel_values: torch.Tensor | None = None
    replaced_mask: torch.Tensor | None = None


class CIMForPreTraining(CIMPreTrainedModel):
    """Generator and enhancer trained together on images corrupted through a frozen tokenizer.

    Pass ``tokenizer=`` to share an already built tokenizer; otherwise it is built from the config.
    The tokenizer never trains and is in no optimizer group. Checkpoints leave it out (it is
    rebuilt from ``config.tokenizer_weights`` on load) unless ``config.save_tokenizer_weights`` is
    set or the tokenizer's weights exist nowhere else (``weights_in_checkpoint``, e.g. a fitted
    codebook).
    """

    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [r"^tokenizer\."]
    # The loss is a per-batch mean; the Trainer scales it for gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: CIMConfig, tokenizer: ImageTokenizer | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer or create_tokenizer(
            config.tokenizer, weights=config.tokenizer_weights, **config.tokenizer_kwargs
        )
        if not self.saves_tokenizer_weights:
            self._keys_to_ignore_on_save = [
                f"tokenizer.{key}" for key in self.tokenizer.state_dict()
            ]
        config.vocab_size = self.tokenizer.vocab_size
        self.enhancer = create_enhancer(config)
        width = config.generator_hidden_size or getattr(self.enhancer, "embed_dim", 384)
        config.generator_hidden_size = width
        config.generator_num_attention_heads = config.generator_num_attention_heads or max(
            width // 64, 1
        )
        self.generator = CIMGenerator(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=width,
            depth=config.generator_num_hidden_layers,
            num_heads=config.generator_num_attention_heads,
            vocab_size=config.vocab_size,
            init_values=config.generator_layer_scale_init_value,
        )
        grid = (config.grid_size, config.grid_size)
        self.enhancer_head = create_head(self.enhancer, config.objective, grid, config.patch_size)
        mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(config.image_std).view(1, 3, 1, 1)
        self.register_buffer("image_mean", mean, persistent=False)
        self.register_buffer("image_std", std, persistent=False)
        # Inside from_pretrained everything is built on the meta device: the tokenizer could not
        # load its weights yet, and _init_weights reloads them once the tensors are real.
        self._tokenizer_needs_reload = any(t.is_meta for t in self._tokenizer_tensors())
        self.post_init()

    @property
    def saves_tokenizer_weights(self) -> bool:
        """Whether checkpoints hold the tokenizer's state: asked for in the config, or the only
        place a data-fitted tokenizer's weights can come back from."""
        fitted = getattr(self.tokenizer, "weights_in_checkpoint", False)
        return bool(self.config.save_tokenizer_weights or fitted)

    def _tokenizer_tensors(self):
        return chain(self.tokenizer.parameters(), self.tokenizer.buffers())

    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if module is not self:
            return
        self.image_mean.copy_(torch.tensor(self.config.image_mean).view(1, 3, 1, 1))
        self.image_std.copy_(torch.tensor(self.config.image_std).view(1, 3, 1, 1))
        # What a checkpoint holds of the tokenizer: its parameters and persistent buffers.
        saved = self.tokenizer.state_dict(keep_vars=True).values()
        in_checkpoint = all(getattr(t, "_is_hf_initialized", False) for t in saved)
        if self._tokenizer_needs_reload and not in_checkpoint:
            if getattr(self.tokenizer, "weights_in_checkpoint", False):
                raise ValueError(
                    f"This checkpoint has no tokenizer.* weights, but the "
                    f"{type(self.tokenizer).__name__}'s weights exist only in checkpoints; load a "
                    "checkpoint saved with its tokenizer, or build the model with tokenizer=."
                )
            self.tokenizer.reload_weights()
        self._tokenizer_needs_reload = False
        self.tokenizer.freeze()  # loading may have replaced its parameters with trainable ones

    @property
    def tokenizer_image_size(self) -> int:
        """Side of the tokenizer's view: one token per enhancer patch (112 for DALL-E at 224)."""
        return self.config.grid_size * self.tokenizer.downsample

    def _check_inputs(self, pixel_values, tokenizer_pixel_values, bool_masked_pos) -> None:
        size, grid, tok = self.config.image_size, self.config.grid_size, self.tokenizer_image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be RGB images (B, 3, {size}, {size}), got "
                f"{tuple(pixel_values.shape)}; convert grayscale images to RGB (PIL: "
                "image.convert('RGB'))."
            )
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])}, but the config's image_size "
                f"is {size}; resize the images or build the model with a matching "
                "CIMConfig(image_size=...)."
            )
        if tuple(tokenizer_pixel_values.shape[-3:]) != (3, tok, tok) or (
            tokenizer_pixel_values.ndim != 4
        ):
            raise ValueError(
                f"tokenizer_pixel_values must be (B, 3, {tok}, {tok}) so that the "
                f"{type(self.tokenizer).__name__} (downsample {self.tokenizer.downsample}) gives "
                f"the {grid}x{grid} grid of the {size}px input with patch size "
                f"{self.config.patch_size}; got {tuple(tokenizer_pixel_values.shape)}."
            )
        if (
            bool_masked_pos.shape[0] != pixel_values.shape[0]
            or bool_masked_pos[0].numel() != grid * grid
        ):
            raise ValueError(
                f"bool_masked_pos must be (B, {grid}, {grid}) or (B, {grid * grid}), got "
                f"{tuple(bool_masked_pos.shape)}."
            )

    # --- The stages of the step, in the order forward calls them ------------------------------

    def tokenize(self, tokenizer_pixel_values: torch.Tensor) -> torch.Tensor:
        """The golden tokens of the clean image: (B, 3, T, T) in [0, 1] -> ids (B, h, w)."""
        input_ids = self.tokenizer.encode(tokenizer_pixel_values)
        grid = (self.config.grid_size, self.config.grid_size)
        if tuple(input_ids.shape[1:]) != grid:
            raise ValueError(
                f"The tokenizer gave a {tuple(input_ids.shape[1:])} grid, expected {grid}."
            )
        return input_ids

    def generate(
        self, pixel_values: torch.Tensor, mask: torch.Tensor, masked_index: torch.Tensor
    ) -> torch.Tensor:
        """The generator's token logits at the masked positions, (B, M, V), from the visible
        patches only. ``mask``: (B, N) bool; ``masked_index``: (B, M) from ``masked_indices``."""
        return self.generator(pixel_values, mask, masked_index)

    def generator_loss(self, logits: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the (B, M, V) logits against the original ids (B, M) of the masked
        tokens."""
        return F.cross_entropy(logits.flatten(0, 1).float(), masked_ids.flatten())

    def sample(
        self, logits: torch.Tensor, input_ids: torch.Tensor, masked_index: torch.Tensor
    ) -> torch.Tensor:
        """The corrupted token grid (B, h, w): masked positions draw from
        softmax(logits / ``config.sampling_temperature``), the others keep their ids. No
        gradient."""
        return sample_tokens(logits, input_ids, masked_index, self.config.sampling_temperature)

    @torch.no_grad()
    def corrupt(self, corrupted_ids: torch.Tensor) -> torch.Tensor:
        """The corrupted image: the frozen decoder paints the (B, h, w) grid, (B, 3, T, T), then
        bilinear upsampling to the enhancer's input, (B, 3, H, W) float32 in [0, 1]."""
        corrupted = self.tokenizer.decode(corrupted_ids)
        size = self.config.image_size
        corrupted = F.interpolate(corrupted, size=size, mode="bilinear", align_corners=False)
        return corrupted.float().clamp(0, 1)  # bilinear can overshoot slightly

    def enhance(self, corrupted_pixel_values: torch.Tensor) -> torch.Tensor:
        """The enhancer's prediction from the corrupted image in [0, 1]: restored pixels
        (B, 3, H, W) for ResPix, replaced-token logits (B, h, w) for RevDet."""
        features = self.enhancer.forward_features(
            (corrupted_pixel_values - self.image_mean) / self.image_std
        )
        prediction = self.enhancer_head(features)
        return prediction if self.config.objective == "respix" else prediction.squeeze(1)

    def enhancer_loss(
        self, prediction: torch.Tensor, pixel_values: torch.Tensor, replaced_mask: torch.Tensor
    ) -> torch.Tensor:
        """ResPix: MSE against every original pixel, sliding-window normalised. RevDet: binary
        cross-entropy of the per-token logits against ``replaced_mask`` (B, h, w)."""
        if self.config.objective == "respix":
            original = pixel_values * self.image_std + self.image_mean  # back to [0, 1]
            target = sliding_window_normalize(original, self.config.window_size)
            return respix_loss(prediction, target)
        return revdet_loss(prediction, replaced_mask)

    def forward(
        self,
        pixel_values: torch.Tensor,
        tokenizer_pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
    ) -> CIMForPreTrainingOutput:
        """One CIM step.

        Args:
            pixel_values: (B, 3, H, W) images normalised with ``config.image_mean/std``.
            tokenizer_pixel_values: (B, 3, T, T) the same crop in [0, 1] at the tokenizer's size.
            bool_masked_pos: (B, h, w) or (B, h*w) masked patches, True = masked; every mask
                holds exactly ``config.num_mask_patches``.
        """
        self._check_inputs(pixel_values, tokenizer_pixel_values, bool_masked_pos)
        mask = bool_masked_pos.flatten(1).bool()  # (B, N)
        masked_index = masked_indices(mask, self.config.num_mask_patches)  # (B, M)

        input_ids = self.tokenize(tokenizer_pixel_values)  # (B, h, w)
        masked_ids = input_ids.flatten(1).gather(1, masked_index)  # (B, M)
        generator_logits = self.generate(pixel_values, mask, masked_index)  # (B, M, V)
        generator_loss = self.generator_loss(generator_logits, masked_ids)

        corrupted_ids = self.sample(generator_logits, input_ids, masked_index)  # (B, h, w)
        corrupted = self.corrupt(corrupted_ids).to(pixel_values.dtype)  # (B, 3, H, W)
        replaced = revdet_labels(input_ids, corrupted_ids, mask)  # (B, h, w)

        prediction = self.enhance(corrupted)  # (B, 3, H, W) or (B, h, w)
        enhancer_loss = self.enhancer_loss(prediction, pixel_values, replaced)

        loss = generator_loss + self.config.enhancer_loss_weight * enhancer_loss
        with torch.no_grad():
            generator_accuracy = (generator_logits.argmax(-1) == masked_ids).float().mean()
            replaced_fraction = replaced.float().sum() / masked_ids.numel()
            revdet_accuracy = None
            if self.config.objective == "revdet":
                revdet_accuracy = ((prediction > 0) == replaced).float().mean()
        return CIMForPreTrainingOutput(
            loss=loss,
            generator_loss=generator_loss,
            enhancer_loss=enhancer_loss,
            generator_accuracy=generator_accuracy,
            replaced_fraction=replaced_fraction,
            revdet_accuracy=revdet_accuracy,
            logits=prediction,
            corrupted_pixel_values=corrupted.detach(),
            replaced_mask=replaced,
        )
