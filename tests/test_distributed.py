import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import FAST

SCRIPT = Path(__file__).with_name("ddp_pretrain.py")
COMMON = FAST + ["--max_steps", "4", "--eval_strategy", "no", "--image_log_steps", "0", "--logging_steps", "1",
                 "--save_strategy", "no", "--use_cpu", "true"]


def _mean_loss(run: Path) -> float:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         *COMMON, "--per_device_train_batch_size", "4", "--output_dir", str(ddp)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = load_file(ddp / "rank0.safetensors"), load_file(ddp / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the ranks in lockstep

    # One process with the same global batch: the same recipe, so the logged loss is close.
    trainer_state = json.loads((ddp / "trainer_state.json").read_text())
    # Really distributed: 4 steps of 2 x 4 images are half of the 64-image epoch (not a quarter).
    assert trainer_state["train_batch_size"] == 4 and trainer_state["epoch"] == pytest.approx(0.5)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *COMMON, "--per_device_train_batch_size", "8", "--output_dir", str(single)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert abs(_mean_loss(ddp) - _mean_loss(single)) < 0.03 * _mean_loss(single)
