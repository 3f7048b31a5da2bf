"""The pre-training loop: the cim-pretrain command, resume, data problems, NaNs, optimizer groups."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from cim_models.training.cli import build_trainer, parse_args
from cim_models.training.trainer import NonFiniteLossError

# The tiny preset, shrunk further: a run of 6 steps takes seconds.
FAST = [
    "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", "--logging_steps", "2",
    "--image_log_steps", "3", "--num_grid_images", "4",
    "--synthetic_train_samples", "64", "--synthetic_eval_samples", "32", "--knn_bank_samples", "64",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
    "--enhancer_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2}',
    "--generator_hidden_size", "32", "--generator_num_hidden_layers", "1",
    "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
]


def _cim_pretrain_command():
    script = Path(sys.executable).with_name("cim-pretrain")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cim_models.training.cli"]


def _run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(_cim_pretrain_command() + args, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def _train_in_process(args):
    trainer, _ = build_trainer(*parse_args(args))
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    return trainer


def test_cim_pretrain_runs_end_to_end(tmp_path):
    result = _run(FAST + ["--output_dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-6"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    weights = load_file(checkpoint / "model.safetensors")
    assert any(k.startswith("enhancer.") for k in weights) and not any(k.startswith("tokenizer.") for k in weights)
    grid = Image.open(run / "image_grids" / "step_0000006.png")
    assert grid.size == (3 * 64, 4 * 64)  # original | corrupted | map, one row per image
    resolved = json.loads((run / "cim_pretrain_config.json").read_text())
    assert resolved["preset"] == "tiny" and resolved["model"]["objective"] == "revdet"
    assert resolved["model"]["enhancer_kwargs"]["depth"] == 2  # explicit flag beat the preset
    assert "CIM pre-training finished" in result.stdout and "kNN top-1" in result.stdout
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    assert history[0]["step"] == 0 and "eval_knn_top1" in history[0]  # the untrained baseline
    train_logs = [h for h in history if "generator_loss" in h]
    assert train_logs and {"enhancer_loss", "generator_accuracy", "replaced_fraction", "revdet_accuracy"} <= set(train_logs[0])


def test_help_is_grouped_and_shows_defaults():
    result = _run(["--help"])
    assert result.returncode == 0
    assert "--preset {resnet50,tiny,vit_base,vit_small}" in result.stdout
    assert "(default: 0.07)" in result.stdout and "--tokenizer_weights" in result.stdout


def test_dall_e_without_weights_says_how_to_convert(tmp_path):
    result = _run(["--preset", "vit_small", "--bf16", "false", "--output_dir", str(tmp_path)])
    assert result.returncode != 0
    assert "convert_dall_e.py" in result.stderr and "--tokenizer palette" in result.stderr


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    full = tmp_path / "full"
    _train_in_process(FAST + ["--output_dir", str(full)])
    # A run killed right after its first checkpoint leaves only checkpoint-3 behind.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    _train_in_process(FAST + ["--output_dir", str(killed), "--resume_from_checkpoint", "last"])
    uninterrupted = load_file(full / "checkpoint-6" / "model.safetensors")
    resumed = load_file(killed / "checkpoint-6" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    assert not torch.equal(uninterrupted["enhancer.cls_token"], load_file(full / "checkpoint-3" / "model.safetensors")["enhancer.cls_token"])


def test_resume_last_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(FAST + ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "last"])


def _write_odd_images(folder: Path) -> dict[str, Path]:
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (80, 70), (40 * i, 100, 200 if label == "a" else 20)).save(folder / label / f"ok{i}.jpg")
    odd = {
        "cmyk": folder / "a" / "cmyk.jpg",
        "sixteen": folder / "a" / "sixteen.png",
        "palette": folder / "b" / "palette.png",
        "tiny": folder / "b" / "tiny.png",
    }
    Image.new("CMYK", (64, 64), (10, 200, 30, 0)).save(odd["cmyk"])
    Image.new("I;16", (64, 64), 30000).save(odd["sixteen"])
    Image.new("P", (64, 64), 3).save(odd["palette"])
    Image.new("RGB", (5, 5), (1, 2, 3)).save(odd["tiny"])
    bad = {
        "corrupt": folder / "a" / "corrupt.jpg",
        "truncated": folder / "b" / "truncated.jpg",
        "empty": folder / "b" / "empty.png",
    }
    bad["corrupt"].write_bytes(b"this is not an image")
    data = (folder / "a" / "ok0.jpg").read_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["empty"].write_bytes(b"")
    return bad


def test_odd_and_broken_images_are_skipped_and_named(tmp_path):
    bad = _write_odd_images(tmp_path / "images")
    args = FAST + ["--train_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / "run"),
                   "--max_steps", "4", "--per_device_train_batch_size", "16", "--image_log_steps", "0"]
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in bad.values():
        assert path.name in result.stderr + result.stdout
    strict = _run(args + ["--strict_data", "true", "--output_dir", str(tmp_path / "strict")])
    assert strict.returncode != 0
    assert any(path.name in strict.stderr for path in bad.values())
    assert "--strict_data" in strict.stderr


def test_empty_folder_fails_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run(FAST + ["--train_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "run")])
    assert result.returncode != 0 and "empty" in result.stderr
    assert not (tmp_path / "run" / "checkpoint-3").exists()


def _nan_at(trainer, steps):
    """Make the model's loss NaN on the given 0-based optimizer steps."""
    model = trainer.model
    forward = model.forward

    def poisoned(*args, **kwargs):
        output = forward(*args, **kwargs)
        if trainer.state.global_step in steps:
            output.loss = output.loss * float("nan")
        return output

    model.forward = poisoned


def test_nan_loss_skips_the_update_and_is_counted(tmp_path):
    trainer, _ = build_trainer(*parse_args(FAST + ["--output_dir", str(tmp_path), "--eval_strategy", "no",
                                                   "--image_log_steps", "0", "--logging_steps", "1"]))
    _nan_at(trainer, {2})
    snapshots = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = model.enhancer.cls_token.detach().clone()

    trainer.add_callback(Record())
    trainer.train()
    assert trainer.nonfinite_steps == 1
    assert torch.equal(snapshots[3], snapshots[2])  # the NaN step changed nothing
    assert not torch.equal(snapshots[4], snapshots[3])  # and training went on
    logged = [h["nonfinite_steps"] for h in trainer.state.log_history if "nonfinite_steps" in h]
    assert logged[-1] == 1


def test_a_stream_of_nans_stops_the_run_with_a_message(tmp_path):
    trainer, _ = build_trainer(*parse_args(FAST + ["--output_dir", str(tmp_path), "--eval_strategy", "no",
                                                   "--image_log_steps", "0", "--max_nonfinite_steps", "2"]))
    _nan_at(trainer, set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row") as error:
        trainer.train()
    assert "checkpoint-3" in str(error.value)  # the last good checkpoint survives and is named
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()


def test_optimizer_groups_and_learning_rate_scaling(tmp_path):
    trainer, _ = build_trainer(*parse_args(FAST + ["--output_dir", str(tmp_path), "--generator_lr_scale", "0.5",
                                                   "--base_learning_rate", "0.0256"]))
    assert trainer.args.learning_rate == pytest.approx(0.0256 * 8 / 256)
    optimizer = trainer.create_optimizer()
    model = trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            by_name[names[id(param)]] = group
    assert not any(name.startswith("tokenizer.") for name in by_name)
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("enhancer.pos_embed", "enhancer.cls_token", "generator.mask_token", "enhancer.norm.weight",
                 "enhancer.blocks.0.attn.qkv.bias", "generator.rel_pos_bias.relative_position_bias_table"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["enhancer.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["generator.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(0.5 * by_name["enhancer.blocks.0.attn.qkv.weight"]["lr"])
    assert names[id(optimizer.param_groups[0]["params"][0])].startswith("enhancer")  # logged lr = enhancer's
