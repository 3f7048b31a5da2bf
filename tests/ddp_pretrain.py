"""Run by tests/test_distributed.py under torchrun: a tiny pre-training whose ranks save their weights."""

import os
import sys

from safetensors.torch import save_file

from cim_models.training.cli import build_trainer, parse_args

if __name__ == "__main__":
    trainer, _ = build_trainer(*parse_args(sys.argv[1:]))
    trainer.train()
    trainer.save_state()  # trainer_state.json with the logged losses (main process)
    rank = trainer.args.process_index
    state = {k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    save_file(state, os.path.join(trainer.args.output_dir, f"rank{rank}.safetensors"))
