"""cim-pretrain on two CPU processes (torchrun, gloo): the ranks stay in lockstep, draw their own
randomness, resume bitwise exactly, and run FSDP2 with the kNN monitor and image grids."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import FAST

SCRIPT = Path(__file__).with_name("ddp_pretrain.py")
# 32 images, 2 ranks x 4 per step: 4 steps per epoch, so checkpoint-3 is mid-epoch 0 and the run
# crosses into epoch 1 after resuming from it.
COMMON = [*FAST, "--eval_strategy", "no", "--image_log_steps", "0", "--logging_steps", "1",
          "--use_cpu", "true"]  # fmt: skip
PER_RANK = ["--per_device_train_batch_size", "4"]


def _torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, "--nproc_per_node", str(processes), str(SCRIPT), *args]
    if processes == 1:
        command = [sys.executable, str(SCRIPT), *args]
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _mean_loss(run: Path) -> float:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "full"
    _torchrun(*COMMON, *PER_RANK, "--output_dir", str(run))
    return run


@pytest.mark.slow
def test_two_cpu_processes_stay_in_lockstep_and_match_one_process(two_process_run, tmp_path):
    rank0 = load_file(two_process_run / "rank0.safetensors")
    rank1 = load_file(two_process_run / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the ranks in lockstep
    state = json.loads((two_process_run / "trainer_state.json").read_text())
    # Really distributed: 6 steps of 2 x 4 images are 1.5 epochs of 32 images (not 0.75).
    assert state["train_batch_size"] == 4 and state["epoch"] == pytest.approx(1.5)
    # One process with the same global batch: the same recipe, so the logged loss is close.
    single = tmp_path / "single"
    _torchrun(*COMMON, "--per_device_train_batch_size", "8", "--output_dir", str(single),
              processes=1)  # fmt: skip
    assert abs(_mean_loss(two_process_run) - _mean_loss(single)) < 0.03 * _mean_loss(single)


@pytest.mark.slow
def test_ranks_draw_different_masks_and_replacement_tokens(two_process_run):
    draws = [load_file(two_process_run / f"rank{r}_draws.safetensors") for r in (0, 1)]
    assert not torch.equal(draws[0]["first_masks"], draws[1]["first_masks"])
    masks = draws[0]["fixed_batch_masks"]
    assert torch.equal(masks, draws[1]["fixed_batch_masks"])  # the same inputs on both ranks
    tokens = [d["fixed_batch_tokens"].flatten(1)[masks.flatten(1)] for d in draws]
    identical = (tokens[0] == tokens[1]).float().mean().item()
    print(f"replacement tokens identical across ranks: {100 * identical:.1f}%")
    assert identical < 0.5


@pytest.mark.slow
def test_two_process_resume_mid_epoch_ends_bitwise_equal(two_process_run, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(two_process_run / "checkpoint-3", killed / "checkpoint-3")
    _torchrun(*COMMON, *PER_RANK, "--output_dir", str(killed))  # resumes checkpoint-3 by itself
    full = load_file(two_process_run / "checkpoint-6" / "model.safetensors")
    resumed = load_file(killed / "checkpoint-6" / "model.safetensors")
    different = [key for key in full if not torch.equal(full[key], resumed[key])]
    print(f"tensors differing after the resume: {len(different)} of {len(full)}")
    assert different == []
    draws = load_file(killed / "rank1_draws.safetensors")
    assert draws["sampler_epoch"].item() == 1  # the resumed run shuffled epoch 1 as epoch 1


@pytest.mark.slow
def test_fsdp2_with_knn_monitor_and_image_grids(tmp_path):
    """Two processes with the kNN monitor, image grids and the end-of-run statistics, which every
    process joins. With two GPUs this is FSDP2. On CPUs accelerate never selects FSDP (its multi-CPU
    mode does not shard, although torch's fully_shard itself runs on gloo), so with --use_cpu the
    Trainer runs the same flags as DDP, which this checks as the fallback."""
    gpus = torch.cuda.device_count() >= 2
    run = tmp_path / "fsdp"
    fsdp = ["--fsdp", "full_shard", "--fsdp_config", '{"version": 2}']
    monitors = ["--eval_strategy", "steps", "--eval_steps", "2", "--image_log_steps", "2"]
    args = [*FAST, "--max_steps", "4", "--save_strategy", "no", *PER_RANK]
    _torchrun(*args, *([] if gpus else ["--use_cpu", "true"]), *fsdp, *monitors,
              "--output_dir", str(run))  # fmt: skip
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    knn = [h["eval_knn_top1"] for h in history if "eval_knn_top1" in h]
    assert len(knn) >= 3 and all(0 <= value <= 1 for value in knn)  # baseline, step 2, step 4
    # The script saves per-rank weights only when FSDP is off.
    assert (run / "rank0.safetensors").exists() != gpus
    rates = [load_file(run / f"rank{r}_draws.safetensors")["majority_token_rate"] for r in (0, 1)]
    assert 0 < rates[0].item() == rates[1].item() < 1
    grids = sorted(p.name for p in (run / "image_grids").iterdir())
    assert grids == ["step_0000002.png", "step_0000004.png"]
