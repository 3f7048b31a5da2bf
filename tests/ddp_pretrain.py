"""Run by tests/test_distributed.py under torchrun: a tiny pre-training whose ranks save what they
end with and what they drew.

Each rank writes ``rank{R}.safetensors`` (its final weights) and ``rank{R}_draws.safetensors``: the
block masks of its first training batch, and the tokens the generator sampled for one fixed batch,
the same on every rank, after training.
"""

import os
import sys

import torch
from safetensors.torch import save_file

from cim_models.training.cli import build_trainer, parse_args


def _record_first_masks(model, draws: dict) -> None:
    forward = model.forward

    def recording(*args, **kwargs):
        draws.setdefault("first_masks", kwargs["bool_masked_pos"].detach().cpu().contiguous())
        return forward(*args, **kwargs)

    model.forward = recording


def _sampled_tokens(trainer, batch: dict) -> torch.Tensor:
    """The generator's samples for ``batch`` in one training step at the current global step."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    sample, samples = model.sample, []

    def recording(*args, **kwargs):
        samples.append(sample(*args, **kwargs))
        return samples[-1]

    model.sample = recording
    try:
        trainer.training_step(trainer.model_wrapped, batch)
    finally:
        del model.sample
    trainer.optimizer.zero_grad(set_to_none=True)
    return samples[0].detach().cpu().contiguous()


if __name__ == "__main__":
    trainer, _ = build_trainer(*parse_args(sys.argv[1:]))
    draws: dict[str, torch.Tensor] = {}
    _record_first_masks(trainer.model, draws)
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json with the logged losses (main process)
    rank, folder = trainer.args.process_index, trainer.args.output_dir
    draws["sampler_epoch"] = torch.tensor(trainer.seeded_sampler.epoch)
    # Every process joins the forwards of the end-of-run summary too.
    draws["majority_token_rate"] = torch.tensor(trainer.majority_token_rate(trainer.train_dataset))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_fsdp_enabled:
        # One fixed batch (same images, crops and masks on every rank): only the step's own
        # randomness (token sampling, drop path) can make the ranks' samples differ.
        collator, dataset = trainer.data_collator, trainer.train_dataset.dataset
        batch = collator([{**dataset[i], "seed": i} for i in range(4)])
        batch = {k: v.to(trainer.args.device) for k, v in batch.items() if k != "labels"}
        draws["fixed_batch_tokens"] = _sampled_tokens(trainer, batch)
        draws["fixed_batch_masks"] = batch["bool_masked_pos"].cpu().contiguous()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(folder, f"rank{rank}.safetensors"))
    save_file(draws, os.path.join(folder, f"rank{rank}_draws.safetensors"))
