"""Callbacks of the CIM pre-training loop: image grids of what the enhancer sees and predicts."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from PIL import Image
from transformers import TrainerCallback

from ..objectives import window_statistics

logger = logging.getLogger(__name__)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def restored_to_pixels(
    prediction: torch.Tensor, original: torch.Tensor, window_size: int
) -> torch.Tensor:
    """Undo the sliding-window normalisation of a ResPix prediction with the original's window
    statistics, so the restoration can be looked at in [0, 1]."""
    mean, var = window_statistics(original, window_size)
    return prediction.float() * torch.sqrt(var + 1e-6) + mean


def replaced_token_map(logits: torch.Tensor, replaced: torch.Tensor, size: int) -> torch.Tensor:
    """RevDet's view as an image: red = predicted probability of "replaced", green = truly replaced.
    Yellow cells are hits, green ones misses, red ones false alarms, black ones correctly kept."""
    red, green = torch.sigmoid(logits.float()), replaced.float()
    grid = torch.stack((red, green, torch.zeros_like(red)), 1)  # (B, 3, h, w)
    return F.interpolate(grid, size=size, mode="nearest")


@torch.no_grad()
def image_grid(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows of original | corrupted | restored (ResPix) or replaced-token map (RevDet): (3, H, W)
    uint8."""
    output = model(**batch)
    original = (batch["pixel_values"] * model.image_std + model.image_mean).float()
    if model.config.objective == "respix":
        third = restored_to_pixels(output.logits, original, model.config.window_size)
    else:
        third = replaced_token_map(output.logits, output.replaced_mask, original.shape[-1])
    rows = torch.cat(
        (original, output.corrupted_pixel_values.float(), third), dim=3
    )  # (B, 3, H, 3W)
    return _to_uint8(torch.cat(list(rows), dim=1).cpu())  # (3, B*H, 3W)


class ImageGridCallback(TrainerCallback):
    """Every ``every_n_steps``, save ``image_grids/step_XXXXXXX.png`` for a fixed batch, and add it
    to TensorBoard through the Trainer's own writer when ``tensorboard`` is a chosen reporter.

    Every process runs the forward (FSDP and DeepSpeed ZeRO-3 need all of them in each forward);
    only the main process writes. The batch (images, crops, masks) is drawn once with its own seed,
    and each grid samples under a forked RNG, so grids are comparable across steps and never change
    the training run's randomness.
    """

    def __init__(
        self,
        batch: dict[str, torch.Tensor],
        every_n_steps: int,
        output_dir: str,
        callback_handler: Any = None,
    ):
        self.batch = batch
        self.every_n_steps = every_n_steps
        self.folder = os.path.join(output_dir, "image_grids")
        self.callback_handler = callback_handler  # the Trainer's, to find its TensorBoard writer
        self.last_path: str | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            self.save(model, state.global_step, state.is_world_process_zero)
        return control

    def save(self, model, step: int, write: bool = True) -> str | None:
        """Draw the grid of ``step`` (every process) and write it (when ``write``)."""
        device = next(model.parameters()).device
        batch = send_to_device(self.batch, device)
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(step)
            grid = image_grid(model, batch)
        model.train(was_training)
        if not write:
            return None
        os.makedirs(self.folder, exist_ok=True)
        self.last_path = os.path.join(self.folder, f"step_{step:07d}.png")
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(self.last_path)
        writer = self._tensorboard_writer()
        if writer is not None:
            writer.add_image("image_grid", grid, step)
        return self.last_path

    def _tensorboard_writer(self):
        """The writer of the Trainer's TensorBoardCallback (one event file for the run)."""
        for callback in getattr(self.callback_handler, "callbacks", ()):
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                return writer
        return None
