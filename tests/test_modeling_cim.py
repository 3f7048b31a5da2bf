"""CIMModel and CIMForImageClassification: the enhancer as a transformers backbone, classifier."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    Trainer,
    TrainingArguments,
)

from cim_models import CIMConfig, CIMForImageClassification, CIMForPreTraining, CIMModel
from tests.tiny import TINY_VIT, tiny_config


def images(batch_size=2, size=64, seed=0):
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("enhancer", ["vit", "resnet"])
def test_cim_model_outputs_are_the_timm_enhancers_features_and_pooled_features(enhancer):
    model = CIMModel(tiny_config(enhancer=enhancer)).eval()
    x = images()
    with torch.no_grad():
        outputs = model(pixel_values=x)
        features = model.enhancer.forward_features(x)
        expected_pooled = model.enhancer(x)  # timm with num_classes=0 returns the pooled feature
    torch.testing.assert_close(outputs.last_hidden_state, features)
    torch.testing.assert_close(outputs.pooler_output, expected_pooled)
    if enhancer == "vit":
        assert outputs.last_hidden_state.shape == (2, 1 + 16, 64)  # class token + 4x4 patches
        # The mean of the patch tokens after the final norm: the class token is never trained.
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 1:].mean(1))
    else:
        # The stride-32 map of the 64 px input, as wide as the last stage.
        assert outputs.last_hidden_state.shape == (2, model.enhancer.num_features, 2, 2)
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean((2, 3)))
    assert outputs.pooler_output.shape == (2, model.enhancer.num_features)
    assert model.config.hidden_size == model.enhancer.num_features
    as_tuple = model(pixel_values=x, return_dict=False)
    assert len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[1], outputs.pooler_output)


def test_a_stock_vit_enhancer_pools_the_patch_tokens_too():
    config = tiny_config(enhancer="vit", enhancer_architecture=None)
    config.enhancer = "vit_tiny_patch16_224"
    model = CIMModel(config).eval()
    with torch.no_grad():
        outputs = model(pixel_values=images())
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 1:].mean(1))
    keys = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT).state_dict()
    assert model.enhancer.state_dict().keys() == keys.keys()  # the pooling changed no weight


def test_hidden_states_are_the_embeddings_and_every_blocks_tokens():
    model = CIMModel(tiny_config()).eval()
    x = images()
    with torch.no_grad():
        outputs = model(pixel_values=x, output_hidden_states=True)
        _, (block0,) = model.enhancer.forward_intermediates(x, indices=[0])  # (2, 64, 4, 4)
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == 1 + TINY_VIT["depth"]
    assert all(h.shape == (2, 1 + 16, 64) for h in hidden_states)
    with torch.no_grad():
        block_outputs = [model.enhancer.blocks[0](hidden_states[0])]
        block_outputs.append(model.enhancer.blocks[1](block_outputs[0]))
    torch.testing.assert_close(hidden_states[1], block_outputs[0])
    torch.testing.assert_close(hidden_states[2], block_outputs[1])
    torch.testing.assert_close(model.enhancer.norm(hidden_states[-1]), outputs.last_hidden_state)
    patches = block0.flatten(2).transpose(
        1, 2
    )  # timm's view of block 0's patch tokens: (2, 16, 64)
    torch.testing.assert_close(hidden_states[1][:, 1:], patches)
    assert len(model(pixel_values=x, output_hidden_states=True, return_dict=False)) == 3

    classifier = CIMForImageClassification(tiny_config(num_labels=3)).eval()
    out = classifier(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == 1 + TINY_VIT["depth"] and out.logits.shape == (2, 3)
    resnet = CIMModel(tiny_config(enhancer="resnet")).eval()
    with torch.no_grad():
        maps = resnet(pixel_values=x, output_hidden_states=True).hidden_states
    assert [m.shape[1] for m in maps] == [info["num_chs"] for info in resnet.enhancer.feature_info]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]  # strides 2, 4, 8, 16, 32 of 64 px


def test_auto_classes_give_the_cim_classes():
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("cim", **fields)
    assert type(config) is CIMConfig
    assert type(AutoModel.from_config(config)) is CIMModel
    assert type(AutoModelForImageClassification.from_config(config)) is CIMForImageClassification
    assert type(AutoModelForPreTraining.from_config(config)) is CIMForPreTraining


def test_timm_keyed_weights_load_under_the_enhancer_prefix(tmp_path):
    # A Hub repo's model.safetensors has timm's names (blocks.0...), the models enhancer.blocks.0...
    config = tiny_config()
    torch.manual_seed(0)
    enhancer = timm.create_model(
        config.enhancer, num_classes=0, img_size=64, **config.enhancer_kwargs
    )
    config.save_pretrained(tmp_path)
    weights = {k: v.contiguous() for k, v in enhancer.state_dict().items()}
    save_file(weights, str(tmp_path / "model.safetensors"))
    for cls, missing in (
        (CIMModel, set()),
        (CIMForImageClassification, {"classifier.weight", "classifier.bias"}),
    ):
        model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["mismatched_keys"]
        assert set(info["missing_keys"]) == missing
        for key, value in enhancer.state_dict().items():
            assert torch.equal(model.enhancer.state_dict()[key], value), key


def test_a_pretraining_checkpoint_loads_into_the_backbone_and_classifier(tmp_path, make_tiny_model):
    pretraining = make_tiny_model(objective="revdet")
    pretraining.save_pretrained(tmp_path)
    # A training checkpoint stays a transformers-native CIM model for the Auto classes.
    assert type(AutoConfig.from_pretrained(tmp_path)) is CIMConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is CIMModel
    backbone, info = CIMModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]  # generator.*, enhancer_head.* are expected extras
    for key, value in pretraining.enhancer.state_dict().items():
        assert torch.equal(backbone.enhancer.state_dict()[key], value), key
    classifier = CIMForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert classifier.classifier.out_features == 3
    assert (
        classifier.classifier.weight.abs().max() < 0.2
    )  # initialised, not left empty from the meta device


def test_classifier_round_trips_through_save_pretrained(tmp_path):
    model = CIMForImageClassification(tiny_config(num_labels=5)).eval()
    model.save_pretrained(tmp_path)
    reloaded = CIMForImageClassification.from_pretrained(tmp_path).eval()
    x = images()
    torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)
    assert "pretrained_cfg" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "num_labels,labels,problem_type",
    [
        (4, torch.tensor([0, 3]), "single_label_classification"),
        (1, torch.tensor([0.5, -1.0]), "regression"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
    ],
)
def test_labels_give_the_loss_of_the_problem_type(num_labels, labels, problem_type):
    model = CIMForImageClassification(tiny_config(num_labels=num_labels))
    outputs = model(pixel_values=images(), labels=labels)
    assert model.config.problem_type == problem_type
    assert outputs.logits.shape == (2, num_labels) and outputs.loss.ndim == 0
    outputs.loss.backward()
    assert model.enhancer.patch_embed.proj.weight.grad is not None


def test_drop_path_rate_reaches_the_enhancer(tmp_path):
    CIMModel(tiny_config()).save_pretrained(tmp_path)
    model = CIMForImageClassification.from_pretrained(tmp_path, num_labels=2, drop_path_rate=0.2)
    assert model.enhancer.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_gradient_checkpointing_reaches_timm():
    model = CIMForImageClassification(tiny_config(num_labels=2))
    model.activation_checkpointing_enable()
    assert model.enhancer.grad_checkpointing
    model(pixel_values=images(), labels=torch.tensor([0, 1])).loss.backward()


def test_classifier_fine_tunes_with_the_plain_trainer(tmp_path):
    torch.manual_seed(0)
    model = CIMForImageClassification(tiny_config(num_labels=3))
    before = model.classifier.weight.detach().clone()
    dataset = [{"pixel_values": images(1, seed=i)[0], "labels": i % 3} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=dataset).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.classifier.weight.detach(), before)


def test_config_reads_the_cim_config_of_an_exported_repo_and_leaves_timms_keys_out():
    cim = tiny_config(objective="revdet").to_dict()
    exported = {"architecture": "vit_tiny_patch16_224", "num_classes": 0,
                "pretrained_cfg": {"tag": "revdet_in1k"}, "model_args": {"depth": 2},
                "cim_config": cim}  # fmt: skip
    config = CIMConfig.from_dict(exported)
    assert config.objective == "revdet" and config.enhancer_kwargs == TINY_VIT
    # An older export kept both halves at the top: the timm half is dropped.
    config = CIMConfig.from_dict(
        {**cim, **exported, "image_processor_type": "X"} | {"cim_config": 1}
    )
    for key in (
        "architecture",
        "num_classes",
        "pretrained_cfg",
        "model_args",
        "image_processor_type",
    ):
        assert key not in config.to_dict()
