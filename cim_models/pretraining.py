"""CIMForPreTraining: the whole CIM step of SPEC.md, top to bottom.

images -> tokens (frozen tokenizer) -> generator on the masked image -> sampled tokens -> corrupted
image (frozen decoder) -> enhancer -> ResPix or RevDet loss. Only the enhancer is kept afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        logits: the enhancer's prediction: restored pixels (B, 3, H, W) in the sliding-window normalised
            space (ResPix) or replaced-token logits (B, h, w) (RevDet).
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
    The tokenizer never trains, is in no optimizer group, and is left out of checkpoints unless
    ``config.save_tokenizer_weights`` (it is rebuilt from ``config.tokenizer_weights`` on load).
    """

    _keys_to_ignore_on_load_missing = [r"^tokenizer\."]
    accepts_loss_kwargs = False  # the loss is a per-batch mean; the Trainer scales it for accumulation

    def __init__(self, config: CIMConfig, tokenizer: ImageTokenizer | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer or create_tokenizer(
            config.tokenizer, weights=config.tokenizer_weights, **config.tokenizer_kwargs
        )
        if not config.save_tokenizer_weights:
            self._keys_to_ignore_on_save = [f"tokenizer.{key}" for key in self.tokenizer.state_dict()]
        config.vocab_size = self.tokenizer.vocab_size
        self.enhancer = create_enhancer(config)
        width = config.generator_hidden_size or getattr(self.enhancer, "embed_dim", 384)
        config.generator_hidden_size = width
        config.generator_num_attention_heads = config.generator_num_attention_heads or max(width // 64, 1)
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
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        # Inside from_pretrained everything is built on the meta device: the tokenizer could not load its
        # weights yet, and _init_weights reloads them once the tensors are real.
        self._tokenizer_needs_reload = any(p.is_meta for p in self.tokenizer.parameters())
        self.post_init()

    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if module is not self:
            return
        self.image_mean.copy_(torch.tensor(self.config.image_mean).view(1, 3, 1, 1))
        self.image_std.copy_(torch.tensor(self.config.image_std).view(1, 3, 1, 1))
        in_checkpoint = all(getattr(p, "_is_hf_initialized", False) for p in self.tokenizer.parameters())
        if self._tokenizer_needs_reload and not in_checkpoint:
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
                f"pixel_values must be RGB images (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "convert grayscale images to RGB (PIL: image.convert('RGB'))."
            )
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])}, but the config's image_size is {size}; "
                "resize the images or build the model with a matching CIMConfig(image_size=...)."
            )
        if tokenizer_pixel_values.ndim != 4 or tuple(tokenizer_pixel_values.shape[1:]) != (3, tok, tok):
            raise ValueError(
                f"tokenizer_pixel_values must be (B, 3, {tok}, {tok}) so that the {type(self.tokenizer).__name__} "
                f"(downsample {self.tokenizer.downsample}) gives the {grid}x{grid} grid of the {size}px input "
                f"with patch size {self.config.patch_size}; got {tuple(tokenizer_pixel_values.shape)}."
            )
        if bool_masked_pos.shape[0] != pixel_values.shape[0] or bool_masked_pos[0].numel() != grid * grid:
            raise ValueError(
                f"bool_masked_pos must be (B, {grid}, {grid}) or (B, {grid * grid}), got {tuple(bool_masked_pos.shape)}."
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        tokenizer_pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        return_loss: bool = True,
    ) -> CIMForPreTrainingOutput:
        """One CIM step.

        Args:
            pixel_values: (B, 3, H, W) images normalised with ``config.image_mean/std``.
            tokenizer_pixel_values: (B, 3, T, T) the same crop in [0, 1] at the tokenizer's size.
            bool_masked_pos: (B, h, w) or (B, h*w) masked patches, True = masked.
        """
        self._check_inputs(pixel_values, tokenizer_pixel_values, bool_masked_pos)
        batch_size, grid = pixel_values.shape[0], self.config.grid_size
        mask = bool_masked_pos.reshape(batch_size, grid * grid).bool()  # (B, N)

        # 1. The golden tokens of the clean image.
        input_ids = self.tokenizer.encode(tokenizer_pixel_values)  # (B, h, w)
        if tuple(input_ids.shape[1:]) != (grid, grid):
            raise ValueError(f"The tokenizer gave a {tuple(input_ids.shape[1:])} grid, expected {(grid, grid)}.")

        # 2. The generator predicts the masked tokens from the visible patches only.
        masked_index = masked_indices(mask, self.config.num_mask_patches)  # (B, M)
        generator_logits = self.generator(pixel_values, mask, masked_index)  # (B, M, V)
        masked_ids = input_ids.reshape(batch_size, -1).gather(1, masked_index)  # (B, M)
        generator_loss = F.cross_entropy(generator_logits.flatten(0, 1).float(), masked_ids.flatten())

        # 3. Sample replacements and paint the corrupted image with the frozen decoder (no gradient).
        corrupted_ids = sample_tokens(
            generator_logits, input_ids, mask, self.config.sampling_temperature, masked_index
        )
        corrupted = self.tokenizer.decode(corrupted_ids)  # (B, 3, T, T) in [0, 1]
        corrupted = F.interpolate(corrupted, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        corrupted = corrupted.clamp(0, 1).to(pixel_values.dtype)  # bilinear can overshoot slightly

        # 4. The enhancer sees only the corrupted image.
        features = self.enhancer.forward_features((corrupted - self.image_mean) / self.image_std)
        prediction = self.enhancer_head(features)
        replaced = revdet_labels(input_ids, corrupted_ids, mask)  # (B, h, w)

        # 5. ResPix: restore every original pixel; RevDet: tell, token by token, which were replaced.
        revdet_accuracy = None
        if self.config.objective == "respix":
            original = pixel_values * self.image_std + self.image_mean  # back to [0, 1]
            target = sliding_window_normalize(original, self.config.window_size)
            enhancer_loss = respix_loss(prediction, target)
        else:
            prediction = prediction.squeeze(1)  # (B, h, w)
            enhancer_loss = revdet_loss(prediction, replaced)
            revdet_accuracy = ((prediction > 0) == replaced).float().mean().detach()

        loss = generator_loss + self.config.enhancer_loss_weight * enhancer_loss
        with torch.no_grad():
            generator_accuracy = (generator_logits.argmax(-1) == masked_ids).float().mean()
            replaced_fraction = replaced.float().sum() / masked_ids.numel()
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
