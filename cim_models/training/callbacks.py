"""Callbacks of the CIM pre-training loop: image grids of what the enhancer sees and predicts."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import TrainerCallback

from ..objectives import window_statistics

logger = logging.getLogger(__name__)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def restored_to_pixels(prediction: torch.Tensor, original: torch.Tensor, window_size: int) -> torch.Tensor:
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
    """Rows of original | corrupted | restored (ResPix) or replaced-token map (RevDet), (3, H, W)."""
    output = model(**batch)
    original = (batch["pixel_values"] * model.image_std + model.image_mean).float()
    if model.config.objective == "respix":
        third = restored_to_pixels(output.logits, original, model.config.window_size)
    else:
        third = replaced_token_map(output.logits, output.replaced_mask, original.shape[-1])
    rows = torch.cat((original, output.corrupted_pixel_values.float(), third), dim=3)  # (B, 3, H, 3W)
    return _to_uint8(torch.cat(list(rows), dim=1).cpu())  # (3, B*H, 3W)


class ImageGridCallback(TrainerCallback):
    """Every ``image_log_steps``, save ``image_grids/step_XXXXXXX.png`` for a fixed batch, and send it
    to TensorBoard when that is a chosen reporter.

    The batch (images, crops, masks) is drawn once with its own seed, and each grid samples under a
    forked RNG, so grids are comparable across steps and never change the training run's randomness.
    """

    def __init__(self, batch: dict[str, torch.Tensor], every_n_steps: int, output_dir: str):
        self.batch = batch
        self.every_n_steps = every_n_steps
        self.folder = os.path.join(output_dir, "image_grids")
        self.tensorboard = None
        self.last_path: str | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0 and state.is_world_process_zero:
            self.save(model, state.global_step, args)
        return control

    def save(self, model, step: int, args) -> str:
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.batch.items()}
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(step)
            grid = image_grid(model, batch)
        model.train(was_training)
        os.makedirs(self.folder, exist_ok=True)
        self.last_path = os.path.join(self.folder, f"step_{step:07d}.png")
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(self.last_path)
        if "tensorboard" in (args.report_to or []):
            self._tensorboard_writer(args).add_image("image_grid", grid, step)
        return self.last_path

    def _tensorboard_writer(self, args):
        if self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR", os.path.join(args.output_dir, "runs"))
            self.tensorboard = SummaryWriter(log_dir=os.path.join(log_dir, "image_grids"))
        return self.tensorboard
