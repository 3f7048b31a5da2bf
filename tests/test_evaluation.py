"""Evaluation: model sources, layer-wise decay, the fine-tuning loss, results files, and the three
commands end to end from a checkpoint that cim-pretrain makes here."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from transformers import TrainingArguments

from cim_models import CIMForImageClassification, CIMForPreTraining, CIMModel
from cim_models.data import ClassificationCollator
from cim_models.evaluation.backbone import (
    find_model,
    load_backbone,
    load_classifier,
    resolve_source,
)
from cim_models.evaluation.cli import eval_main, finetune_main, parse_finetune_args
from cim_models.evaluation.finetune import (
    FINETUNE_PRESETS,
    FinetuneTrainer,
    RecipeArguments,
    create_mixup,
    create_optimizer,
)
from cim_models.evaluation.results import FORMAT, card_results, read_results
from cim_models.hub.export import export
from cim_models.training.cli import main as pretrain_main
from tests.hub_cache import populate_hf_cache
from tests.test_training import FAST
from tests.tiny import tiny_config

DECAY = 0.5
BASE_LR = 1e-3


def _learning_rates(model, optimizer):
    by_param = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters()}


def _create_optimizer(model, tmp_path, layer_decay=DECAY):
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=BASE_LR, weight_decay=0.05, report_to="none"
    )
    return create_optimizer(model, RecipeArguments(layer_decay=layer_decay), args)


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def test_layer_decay_scales_each_vit_layer_by_decay_to_its_distance_from_the_top(tmp_path):
    depth = 3
    vit = dict(depth=depth, embed_dim=32, num_heads=2)
    model = CIMForImageClassification(tiny_config(enhancer_kwargs=vit, num_labels=5))
    top = depth + 1  # BEiT: embeddings 0, block i -> i + 1, the classifier on top

    def layer(name):
        if name.startswith(("enhancer.cls_token", "enhancer.pos_embed", "enhancer.patch_embed")):
            return 0
        block = re.match(r"enhancer\.blocks\.(\d+)\.", name)
        if block:
            return int(block.group(1)) + 1
        if name.startswith("enhancer.norm."):
            return depth  # timm groups the final norm with the last block
        assert name.startswith("classifier."), name
        return top

    optimizer = _create_optimizer(model, tmp_path)
    rates = _learning_rates(model, optimizer)
    for name, lr in rates.items():
        assert lr == pytest.approx(BASE_LR * DECAY ** (top - layer(name))), name
    assert rates["enhancer.cls_token"] == pytest.approx(BASE_LR * DECAY**4)
    assert rates["classifier.weight"] == BASE_LR
    assert optimizer.param_groups[0]["lr"] == BASE_LR  # the group the Trainer logs: the peak rate
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["enhancer.blocks.0.attn.qkv.weight"])] == 0.05
    assert decay[id(named["classifier.weight"])] == 0.05
    no_decay = ["enhancer.pos_embed", "enhancer.cls_token", "enhancer.norm.weight"]
    for name in [*no_decay, "classifier.bias"]:
        assert decay[id(named[name])] == 0.0, name


def test_layer_decay_scales_each_resnet_block_by_stage_order(tmp_path):
    layers = (2, 1, 1, 1)
    config = tiny_config(enhancer="resnet", enhancer_kwargs=dict(layers=layers), num_labels=5)
    model = CIMForImageClassification(config)
    # timm's group_matcher: the stem is layer 0, then every residual block in stage order.
    blocks = [(stage + 1, block) for stage, n in enumerate(layers) for block in range(n)]
    block_layer = {key: i for i, key in enumerate(blocks, start=1)}
    top = len(blocks) + 1  # the classifier

    def layer(name):
        block = re.match(r"enhancer\.layer(\d+)\.(\d+)\.", name)
        if block:
            return block_layer[int(block.group(1)), int(block.group(2))]
        if name.startswith(("enhancer.conv1", "enhancer.bn1")):
            return 0
        assert name.startswith("classifier."), name
        return top

    rates = _learning_rates(model, _create_optimizer(model, tmp_path))
    for name, lr in rates.items():
        assert lr == pytest.approx(BASE_LR * DECAY ** (top - layer(name))), name
    second, first = rates["enhancer.layer1.1.conv1.weight"], rates["enhancer.layer1.0.conv1.weight"]
    assert second == pytest.approx(first / DECAY)


def test_scheduler_keeps_the_layer_ratios(tmp_path):
    model = CIMForImageClassification(tiny_config(num_labels=3))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=BASE_LR,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_steps=10,
        report_to="none",
        use_cpu=True,
    )
    trainer = FinetuneTrainer(model=model, args=args, recipe=RecipeArguments(layer_decay=DECAY))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    for _ in range(4):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    rates = _learning_rates(model, trainer.optimizer)
    ratio = rates["enhancer.blocks.0.mlp.fc1.weight"] / rates["classifier.weight"]
    assert ratio == pytest.approx(DECAY**2)  # depth 2: block 0 is layer 1, the classifier layer 3
    assert 0 < rates["classifier.weight"] < BASE_LR


# --------------------------------------------------------------------------------------------------
# Mixup targets and the loss


def test_mixup_gives_soft_targets_and_the_loss_is_soft_cross_entropy_not_multilabel(tmp_path):
    recipe = RecipeArguments(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mixup = create_mixup(recipe, num_classes=10)
    collator = ClassificationCollator(lambda image: torch.zeros(3, 64, 64), mixup)
    batch = collator([{"image": None, "label": i % 10} for i in range(6)])
    assert batch["labels"].shape == (6, 10)
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(6))
    odd = collator([{"image": None, "label": i} for i in range(3)])  # Mixup needs pairs
    assert odd["labels"][0].argmax() == 0 and odd["labels"][0].max() == pytest.approx(0.91)

    model = CIMForImageClassification(tiny_config(num_labels=10)).train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = FinetuneTrainer(model=model, args=args, recipe=recipe)
    inputs = {"pixel_values": torch.randn(6, 3, 64, 64), "labels": batch["labels"]}
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    torch.testing.assert_close(loss, SoftTargetCrossEntropy()(outputs.logits, batch["labels"]))
    assert model.config.problem_type is None  # the model's own loss would turn to multi-label BCE


def test_every_preset_names_only_existing_flags():
    from dataclasses import fields

    known = {f.name for f in fields(RecipeArguments)} | {f.name for f in fields(TrainingArguments)}
    for name, preset in FINETUNE_PRESETS.items():
        assert set(preset) <= known, (name, set(preset) - known)
    beit = FINETUNE_PRESETS["vit_base"]
    assert beit["layer_decay"] == 0.65
    assert beit["base_learning_rate"] * 1024 / 256 == pytest.approx(4e-3)  # BEiT, batch 1024


# --------------------------------------------------------------------------------------------------
# Model sources


def test_every_model_source_loads_the_same_backbone(tmp_path, monkeypatch):
    torch.manual_seed(0)
    pretraining = CIMForPreTraining(tiny_config(objective="revdet"))
    checkpoint = tmp_path / "run" / "checkpoint-4"
    pretraining.save_pretrained(checkpoint)  # enhancer.*, generator.*, enhancer_head.*
    (checkpoint / "trainer_state.json").write_text("{}")  # what makes a checkpoint complete
    (tmp_path / "run" / "checkpoint-8").mkdir()  # cut off while saving: no trainer_state.json
    exported = tmp_path / "exported"  # what cim-export writes: timm's config and key names
    export(checkpoint, exported)
    saved = tmp_path / "saved"  # a backbone saved with save_pretrained
    enhancer_state = {k: v.contiguous() for k, v in pretraining.enhancer.state_dict().items()}
    pretraining.config.save_pretrained(saved)
    save_file(enhancer_state, str(saved / "model.safetensors"), metadata={"format": "pt"})
    cache = tmp_path / "hub"
    populate_hf_cache("cim-test/tiny", exported, cache)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))

    sources = (checkpoint, tmp_path / "run", exported, saved)
    for source in (*map(str, sources), "cim-test/tiny"):
        model = find_model(source)
        backbone = load_backbone(model)
        assert isinstance(backbone, CIMModel) and not backbone.training
        loaded = backbone.enhancer.state_dict()
        for key, value in enhancer_state.items():
            torch.testing.assert_close(loaded[key], value, msg=f"{source}: {key}")
        classifier = load_classifier(model, 7, drop_path_rate=0.2)
        assert classifier.classifier.out_features == 7
        assert classifier.config.drop_path_rate == 0.2
        torch.testing.assert_close(classifier.enhancer.pos_embed, enhancer_state["pos_embed"])
    # A run folder whose final model is not saved yet resolves to its last checkpoint.
    assert resolve_source(str(tmp_path / "run")).endswith("checkpoint-4")


def test_a_folder_that_is_not_a_cim_model_is_refused_with_what_to_pass(tmp_path):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not 'cim'.*cim-pretrain run"):
        find_model(str(tmp_path / "vit"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        find_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="No folder"):
        find_model(str(tmp_path / "missing"))


def test_unlabelled_data_is_refused_with_what_to_pass(tmp_path, capsys):
    from PIL import Image

    CIMModel(tiny_config()).save_pretrained(tmp_path / "model")
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / split / "a.png")
    args = [
        "knn",
        "--model_name_or_path",
        str(tmp_path / "model"),
        "--train_dir",
        str(tmp_path / "train"),
        "--validation_dir",
        str(tmp_path / "val"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert eval_main(args) == 1
    assert "no labels" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The three commands end to end, from a checkpoint cim-pretrain writes

# A tiny CNN enhancer: on 2 CPU cores a ResNet learns the shapes in a hundred steps, a ViT of the
# same cost does not, and fine-tuning must have learnt something to beat the probe.
TINY_RESNET = [
    "--enhancer",
    "cim_resnet50",
    "--enhancer_kwargs",
    '{"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}',
]
DATA = ["--synthetic_train_samples", "600", "--synthetic_eval_samples", "200"]
QUIET = ["--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """cim-pretrain (FAST, a tiny ResNet), then cim-eval knn, cim-eval linear and cim-finetune."""
    root = tmp_path_factory.mktemp("evaluation")
    run = root / "run"
    quick = ["--image_log_steps", "0", "--eval_strategy", "no"]  # the kNN monitor has its tests
    pretrain = [*FAST, *TINY_RESNET, *quick, "--output_dir", str(run)]
    assert pretrain_main(pretrain) == 0
    model = ["--model_name_or_path", str(run / "checkpoint-6")]
    for command in ("knn", "linear"):
        output = ["--num_workers", "0", "--output_dir", str(root / "eval")]
        assert eval_main([command, *model, *DATA, *QUIET, *output]) == 0
    # A few steps of the tiny recipe: the results file; the recipe's quality has its own test.
    args = [
        *model,
        *DATA,
        *QUIET,
        *RECIPE,
        "--max_steps",
        "3",
        "--output_dir",
        str(root / "finetune"),
    ]
    assert finetune_main(args) == 0
    return root


# The tiny preset with more, smaller steps and no crops.
RECIPE = ["--per_device_train_batch_size", "16", "--base_learning_rate", "0.1",
          "--min_crop_scale", "1.0", "--dataloader_pin_memory", "false"]  # fmt: skip


def _results(evaluated, task):
    folder = "finetune" if task == "finetune" else "eval"
    return read_results(evaluated / folder / f"{task}_results.json")


def test_the_commands_write_results_with_the_schema(evaluated):
    for task in ("knn", "linear_probe", "finetune"):
        results = _results(evaluated, task)
        assert results["format"] == FORMAT and results["task"] == task
        assert results["dataset"] == {
            "name": "synthetic-shapes",
            "source": results["dataset"]["source"],
            "train_split": "train",
            "split": "validation",
            "num_classes": 10,
        }
        assert results["num_train_samples"] == 600 and results["num_eval_samples"] == 200
        assert set(results["metrics"]) == {"top1", "top5"}
        assert all(0 <= v <= 100 for v in results["metrics"].values())
        assert results["model"].endswith("checkpoint-6") and results["recipe"]
        rows = card_results(results)
        metrics = results["metrics"]
        assert [r["value"] for r in rows] == [metrics["top1"], metrics["top5"]]
        assert {r["dataset"] for r in rows} == {"synthetic-shapes"}
        assert rows[0]["protocol"] == results["protocol"]
    assert _results(evaluated, "knn")["recipe"]["k"] == 20
    finetuned = CIMForImageClassification.from_pretrained(evaluated / "finetune")
    assert finetuned.config.id2label[0] == "disc" and finetuned.config.problem_type is None


@pytest.mark.slow
def test_finetuned_beats_linear_probe_which_beats_chance(evaluated):
    # 75 steps of 16 images (2 epochs).
    model = ["--model_name_or_path", str(evaluated / "run" / "checkpoint-6")]
    output = ["--output_dir", str(evaluated / "finetune-2-epochs")]
    assert finetune_main([*model, *DATA, *QUIET, *RECIPE, "--num_train_epochs", "2", *output]) == 0
    probe = _results(evaluated, "linear_probe")["metrics"]["top1"]
    finetuned = read_results(evaluated / "finetune-2-epochs" / "finetune_results.json")
    finetuned = finetuned["metrics"]["top1"]
    chance = 100 / 10
    assert probe > chance + 5, (probe, finetuned)
    assert finetuned > probe + 5, (probe, finetuned)


def test_linear_probe_reuses_the_cached_features(evaluated, monkeypatch):
    from cim_models.evaluation import features

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features, "extract_features", fail)
    model = ["--model_name_or_path", str(evaluated / "run" / "checkpoint-6")]
    args = ["linear", *model, *DATA, *QUIET, "--output_dir", str(evaluated / "eval")]
    assert eval_main(args) == 0


def test_vit_preset_with_mixup_randaugment_and_layer_decay_runs(tmp_path):
    """The BEiT recipe's whole data and optimizer path through the Trainer, on a tiny ViT."""
    torch.manual_seed(0)
    CIMForPreTraining(tiny_config(objective="revdet")).save_pretrained(tmp_path / "checkpoint-1")
    args = [
        "--preset",
        "vit_small",
        "--model_name_or_path",
        str(tmp_path / "checkpoint-1"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--synthetic_train_samples",
        "16",
        "--synthetic_eval_samples",
        "8",
        "--bf16",
        "false",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
        "--dataloader_persistent_workers",
        "false",
        "--dataloader_pin_memory",
        "false",
        "--output_dir",
        str(tmp_path / "finetune"),
        *QUIET,
    ]
    assert finetune_main(args) == 0
    recipe = read_results(tmp_path / "finetune" / "finetune_results.json")["recipe"]
    assert recipe["layer_decay"] == 0.75 and recipe["mixup"] == 0.8 and recipe["cutmix"] == 1.0
    assert recipe["auto_augment"] == "rand-m9-mstd0.5-inc1" and recipe["reprob"] == 0.25
    assert recipe["learning_rate"] == pytest.approx(1e-3 * 8 / 256) and recipe["steps_done"] == 2


def test_console_scripts_are_installed():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["cim-eval"] == "cim_models.evaluation.cli:eval_main"
    assert scripts["cim-finetune"] == "cim_models.evaluation.cli:finetune_main"
    assert Path(sys.executable).with_name("cim-eval").exists()


# --------------------------------------------------------------------------------------------------
# cim-finetune's flags do what they say


def _finetune_args(tmp_path, *flags):
    return parse_finetune_args(
        ["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "ft"),
         *flags]
    )  # fmt: skip


def test_finetune_learning_rate_flags(tmp_path):
    args = _finetune_args(tmp_path, "--learning_rate", "0.0123")[3]
    assert args.learning_rate == 0.0123  # an explicit rate is not replaced by the preset's
    args = _finetune_args(tmp_path, "--per_device_train_batch_size", "32")[3]
    assert args.learning_rate == pytest.approx(FINETUNE_PRESETS["tiny"]["base_learning_rate"] / 8)
    args = _finetune_args(tmp_path, "--base_learning_rate", "0.01")[3]
    assert args.learning_rate == pytest.approx(0.01 * 64 / 256)


def test_finetune_optim_and_label_smoothing_factor_are_used(tmp_path):
    _, _, recipe, args = _finetune_args(
        tmp_path, "--optim", "sgd", "--label_smoothing_factor", "0.2", "--learning_rate", "0.01"
    )
    assert recipe.label_smoothing == 0.2 and args.label_smoothing_factor == 0.0  # smoothed once
    model = CIMForImageClassification(tiny_config(num_labels=3))
    optimizer = create_optimizer(model, recipe, args)
    assert isinstance(optimizer, torch.optim.SGD)
    rates = _learning_rates(model, optimizer)
    decay = FINETUNE_PRESETS["tiny"]["layer_decay"]
    assert rates["classifier.weight"] == 0.01 and rates["enhancer.cls_token"] < 0.01 * decay
    trainer = FinetuneTrainer(model=model, args=args, recipe=recipe)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    expected = LabelSmoothingCrossEntropy(0.2)(logits, labels)
    torch.testing.assert_close(trainer.train_loss_fn(logits, labels), expected)
    with pytest.raises(SystemExit):  # two names for one setting, disagreeing
        _finetune_args(tmp_path, "--optim", "sgd", "--optimizer", "lamb")


def test_finetune_resumes_from_the_output_folder(tmp_path):
    checkpoint = tmp_path / "ft" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert _finetune_args(tmp_path)[3].resume_from_checkpoint == str(checkpoint)
    last = _finetune_args(tmp_path, "--resume_from_checkpoint", "last")[3]
    assert last.resume_from_checkpoint == str(checkpoint)
