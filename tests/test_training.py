"""The pre-training loop: the cim-pretrain command, its flags, resume, data problems, NaNs,
optimizer groups."""

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from cim_models.data import UnreadableImageError
from cim_models.training.cli import build_trainer, main, parse_args
from cim_models.training.presets import PRESETS
from cim_models.training.trainer import NonFiniteLossError

# The tiny preset, shrunk further: 6 steps of 8 images take seconds. 32 training images make an
# epoch of 4 steps, so a run resumed from checkpoint-3 resumes mid-epoch and crosses an epoch.
FAST = [
    "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", "--logging_steps", "2",
    "--image_log_steps", "3", "--num_grid_images", "4",
    "--synthetic_train_samples", "32", "--synthetic_eval_samples", "32", "--knn_bank_samples", "32",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
    "--enhancer_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 64, "num_heads": 2}',
    "--generator_hidden_size", "32", "--generator_num_hidden_layers", "1",
    "--dataloader_pin_memory", "false", "--disable_tqdm", "true", "--tokenizer_fit_samples", "32",
]  # fmt: skip


def run_main(args: list[str]) -> str:
    """``cim-pretrain ARGS`` in this process; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return printed.getvalue()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One FAST cim-pretrain run (kNN monitor, image grids, checkpoints 3 and 6) and its output."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    return run, run_main([*FAST, "--output_dir", str(run)])


def test_cim_pretrain_runs_end_to_end(pretrained):
    run, printed = pretrained
    checkpoint = run / "checkpoint-6"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    weights = _weights(checkpoint)
    assert any(k.startswith("enhancer.") for k in weights)
    # The tiny preset's codebook was fitted on the training images before training, and travels
    # in the checkpoint (nothing else could rebuild it).
    assert weights["tokenizer.fitted"].item() and weights["tokenizer.centroids"].std() > 0
    grid = Image.open(run / "image_grids" / "step_0000006.png")
    assert grid.size == (3 * 64, 4 * 64)  # original | corrupted | map, one row per image
    resolved = json.loads((run / "cim_pretrain_config.json").read_text())
    assert resolved["preset"] == "tiny" and resolved["model"]["objective"] == "revdet"
    assert resolved["model"]["enhancer_kwargs"]["depth"] == 2  # explicit flag beat the preset
    assert "CIM pre-training finished" in printed
    assert "trained vs" in printed and "untrained" in printed  # kNN: did pre-training help?
    assert (
        "generator masked-token accuracy (held-out split)" in printed and "chance 1/512" in printed
    )
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    assert history[0]["step"] == 0 and "eval_knn_top1" in history[0]  # the untrained baseline
    train_logs = [h for h in history if "generator_loss" in h]
    expected = {"enhancer_loss", "generator_accuracy", "replaced_fraction", "revdet_accuracy"}
    assert train_logs and expected <= set(train_logs[0])
    assert not (run / "knn_baseline.json").exists()  # the baseline lives in the log history


def test_help_is_grouped_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "--preset {resnet50,tiny,vit_base,vit_small}" in printed
    assert "(default: 0.07)" in printed and "--tokenizer_weights" in printed
    assert "--overwrite_output_dir" in printed and "--model_name_or_path" in printed


def test_dall_e_without_weights_says_how_to_convert(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        build_trainer(
            *parse_args(["--preset", "vit_small", "--bf16", "false", "--output_dir", str(tmp_path)])
        )
    assert "cim-convert-dall-e" in str(exit_.value) and "--tokenizer palette" in str(exit_.value)


# --------------------------------------------------------------------------------------------------
# Flags do what they say


def test_explicit_learning_rate_is_the_rate_used(tmp_path):
    trainer, _ = build_trainer(
        *parse_args([*FAST, "--learning_rate", "0.0123", "--output_dir", str(tmp_path)])
    )
    assert trainer.args.learning_rate == 0.0123  # not the preset's base rate x batch / 256
    assert trainer.create_optimizer().param_groups[0]["lr"] == 0.0123


def test_base_learning_rate_scales_with_the_global_batch(tmp_path):
    preset_base = PRESETS["tiny"]["base_learning_rate"]
    args = parse_args([*FAST, "--output_dir", str(tmp_path)])[2]  # the preset's base rate
    assert args.learning_rate == pytest.approx(preset_base * 8 / 256)
    args = parse_args([*FAST, "--base_learning_rate", "0.0256", "--output_dir", str(tmp_path)])[2]
    assert args.learning_rate == pytest.approx(0.0256 * 8 / 256)
    with pytest.raises(SystemExit):  # two rates that would disagree
        parse_args([*FAST, "--learning_rate", "1e-3", "--base_learning_rate", "1e-3"])


def test_pinned_memory_defaults_to_whether_a_gpu_exists_and_the_flag_wins(tmp_path):
    args = parse_args([*FAST, "--output_dir", str(tmp_path)])[2]
    assert args.dataloader_pin_memory == torch.cuda.is_available()
    flag = str(not torch.cuda.is_available()).lower()
    args = parse_args([*FAST, "--dataloader_pin_memory", flag, "--output_dir", str(tmp_path)])[2]
    assert args.dataloader_pin_memory != torch.cuda.is_available()


def test_own_data_without_a_preset_is_refused_listing_the_presets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert "--preset" in error and all(name in error for name in PRESETS)
    assert not (tmp_path / "run").exists()  # refused before any work


# --------------------------------------------------------------------------------------------------
# Resume


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(pretrained, tmp_path):
    full, _ = pretrained
    # A run killed while saving checkpoint-5, after checkpoint-3: checkpoint-5 has no
    # trainer_state.json. Rerunning the same command resumes from checkpoint-3 by itself (mid-epoch
    # 0 of 4-step epochs), crosses into epoch 1 and ends where the uninterrupted run ended.
    killed = tmp_path / "killed"
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-5")
    (killed / "checkpoint-5" / "trainer_state.json").unlink()
    args = parse_args([*FAST, "--output_dir", str(killed)])
    assert args[2].resume_from_checkpoint == str(killed / "checkpoint-3")
    trainer, _ = build_trainer(*args)
    trainer.train(resume_from_checkpoint=args[2].resume_from_checkpoint)
    assert trainer.state.epoch > 1  # crossed an epoch boundary after resuming
    assert trainer.seeded_sampler.epoch == 1  # and shuffled epoch 1 as epoch 1
    uninterrupted, resumed = _weights(full / "checkpoint-6"), _weights(killed / "checkpoint-6")
    assert uninterrupted.keys() == resumed.keys()
    different = [key for key in uninterrupted if not torch.equal(uninterrupted[key], resumed[key])]
    assert different == []
    at_three = _weights(full / "checkpoint-3")
    assert not torch.equal(uninterrupted["enhancer.cls_token"], at_three["enhancer.cls_token"])


def test_resume_flags_pick_the_newest_complete_checkpoint(pretrained, tmp_path, caplog):
    full, _ = pretrained
    run = tmp_path / "run"
    for step in (3, 6):
        shutil.copytree(full / f"checkpoint-{step}", run / f"checkpoint-{step}")
    (run / "checkpoint-6" / "trainer_state.json").unlink()  # cut off while saving
    for flag in ("last", "true", "True"):
        args = parse_args([*FAST, "--output_dir", str(run), "--resume_from_checkpoint", flag])[2]
        assert args.resume_from_checkpoint == str(run / "checkpoint-3"), flag
    assert "checkpoint-6" in caplog.text and "not completely saved" in caplog.text
    path = str(full / "checkpoint-6")
    args = parse_args([*FAST, "--output_dir", str(run), "--resume_from_checkpoint", path])[2]
    assert args.resume_from_checkpoint == path


def test_output_folder_without_checkpoints_is_refused_unless_overwritten(tmp_path, capsys):
    with pytest.raises(SystemExit):  # nothing to resume from
        parse_args([*FAST, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "last"])
    (tmp_path / "notes.txt").write_text("someone else's file")
    with pytest.raises(SystemExit):
        parse_args([*FAST, "--output_dir", str(tmp_path)])
    assert "--overwrite_output_dir" in capsys.readouterr().err
    args = parse_args([*FAST, "--output_dir", str(tmp_path), "--overwrite_output_dir", "true"])[2]
    assert args.resume_from_checkpoint is None and not (tmp_path / "notes.txt").exists()


# --------------------------------------------------------------------------------------------------
# Data problems


def _write_odd_images(folder: Path) -> dict[str, Path]:
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            colour = (40 * i, 100, 200 if label == "a" else 20)
            Image.new("RGB", (80, 70), colour).save(folder / label / f"ok{i}.jpg")
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
    args = [*FAST, "--preset", "tiny", "--train_dir", str(tmp_path / "images"), "--max_steps",
            "4", "--per_device_train_batch_size", "16", "--image_log_steps", "0"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        printed = run_main([*args, "--output_dir", str(tmp_path / "run")])
    warned = "\n".join(str(w.message) for w in caught)
    for path in bad.values():
        assert path.name in warned and path.name in printed  # warned, and listed in the summary
    strict = [*args, "--strict_data", "true", "--output_dir", str(tmp_path / "strict")]
    with pytest.raises(UnreadableImageError, match="--strict_data") as error:
        main(strict)
    assert any(path.name in str(error.value) for path in bad.values())


def test_empty_folder_fails_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    args = [*FAST, "--preset", "tiny", "--train_dir", str(tmp_path / "empty")]
    with pytest.raises(ValueError, match="No image files found under .*empty"):
        main([*args, "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoint-3").exists()


# --------------------------------------------------------------------------------------------------
# Non-finite losses


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
    args = [*FAST, "--output_dir", str(tmp_path), "--eval_strategy", "no",
            "--image_log_steps", "0", "--logging_steps", "1", "--save_strategy", "no"]  # fmt: skip
    trainer, _ = build_trainer(*parse_args(args))
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
    args = [*FAST, "--output_dir", str(tmp_path), "--eval_strategy", "no",
            "--image_log_steps", "0", "--max_nonfinite_steps", "2"]  # fmt: skip
    trainer, _ = build_trainer(*parse_args(args))
    _nan_at(trainer, set(range(4, 100)))
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row") as error:
        trainer.train()
    assert "checkpoint-3" in str(error.value)  # the last good checkpoint survives and is named
    assert (tmp_path / "checkpoint-3" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# Optimizer groups


def test_optimizer_groups(tmp_path):
    args = [*FAST, "--output_dir", str(tmp_path), "--generator_lr_scale", "0.5"]
    trainer, _ = build_trainer(*parse_args(args))
    optimizer = trainer.create_optimizer()
    model = trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            by_name[names[id(param)]] = group
    assert not any(name.startswith("tokenizer.") for name in by_name)
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("enhancer.pos_embed", "enhancer.cls_token", "generator.mask_token",
                 "enhancer.norm.weight", "enhancer.blocks.0.attn.qkv.bias",
                 "generator.rel_pos_bias.relative_position_bias_table"):  # fmt: skip
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["enhancer.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    enhancer_lr = by_name["enhancer.blocks.0.attn.qkv.weight"]["lr"]
    assert by_name["generator.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(0.5 * enhancer_lr)
    first = names[id(optimizer.param_groups[0]["params"][0])]
    assert first.startswith("enhancer")  # the logged learning rate is the enhancer's


# --------------------------------------------------------------------------------------------------
# Starting from weights


def test_model_name_or_path_continues_a_pre_training_checkpoint(pretrained, tmp_path):
    run, _ = pretrained
    args = [*FAST, "--model_name_or_path", str(run / "checkpoint-6")]
    trainer, _ = build_trainer(*parse_args([*args, "--output_dir", str(tmp_path)]))
    saved = _weights(run / "checkpoint-6")
    state = trainer.model.state_dict()
    for key in ("enhancer.cls_token", "generator.blocks.0.attn.qkv.weight", "tokenizer.centroids"):
        assert torch.equal(state[key], saved[key]), key


def test_model_name_or_path_starts_the_enhancer_from_timm_weights(tmp_path, monkeypatch):
    import timm
    from timm.models import save_for_hf

    from tests.hub_cache import populate_hf_cache

    sizes = dict(depth=2, patch_size=8, embed_dim=64, num_heads=2, img_size=64)
    source = timm.create_model("cim_vit_tiny_patch16_224", num_classes=0, **sizes)
    save_for_hf(source, str(tmp_path / "repo"))
    populate_hf_cache("cim-test/backbone", tmp_path / "repo", tmp_path / "hub")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    args = [*FAST, "--model_name_or_path", "hf-hub:cim-test/backbone"]
    trainer, _ = build_trainer(*parse_args([*args, "--output_dir", str(tmp_path / "run")]))
    enhancer = trainer.model.enhancer.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(enhancer[key], value), key
    args = [*FAST, "--model_name_or_path", "hf-hub:cim-test/missing"]
    with pytest.raises(ValueError, match="timm could not load"):
        build_trainer(*parse_args([*args, "--output_dir", str(tmp_path / "run2")]))


def test_image_grids_go_through_the_trainers_tensorboard_writer(tmp_path):
    from cim_models.training.callbacks import ImageGridCallback
    from tests.tiny import tiny_batch, tiny_model

    class Writer:
        def __init__(self):
            self.images = []

        def add_image(self, tag, image, step):
            self.images.append((tag, tuple(image.shape), step))

    writer = Writer()
    handler = type("Handler", (), {"callbacks": [type("TB", (), {"tb_writer": writer})()]})()
    model = tiny_model(objective="revdet")
    grids = ImageGridCallback(tiny_batch(model, batch_size=2), 5, str(tmp_path), handler)
    assert grids.save(model, 5, write=False) is None and not (tmp_path / "image_grids").exists()
    path = grids.save(model, 10)
    assert Image.open(path).size == (3 * 64, 2 * 64)
    assert writer.images == [("image_grid", (3, 2 * 64, 3 * 64), 10)]  # one writer: the Trainer's
