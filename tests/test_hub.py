"""Hub packaging: export a checkpoint, load the repo through every library path offline, publish it.

One tiny CIM (ViT enhancer, 64px) is trained for two steps and saved like a Trainer checkpoint,
exported with ``cim-export`` and put into a hand-built Hub cache under the repo id that timm's
registry gives ``cim_vit_tiny_patch16_224``. Fresh interpreters (``HF_HUB_OFFLINE=1``) then load it
through timm and transformers, with cim_models importable and with it blocked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
import timm
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, TimmWrapperConfig, TrainingArguments

import cim_models
from cim_models import CIMConfig, CIMForImageClassification, CIMForPreTraining, CIMModel
from cim_models.hub import export as cim_export
from cim_models.hub import model_card, publish
from tests.hub_cache import populate_hf_cache
from tests.tiny import TINY_VIT, tiny_batch, tiny_model

REPO = Path(__file__).resolve().parents[1]
ENHANCER = "cim_vit_tiny_patch16_224"
# What the registered name needs besides pretrained=True to build the tiny architecture.
ENHANCER_KWARGS = {**TINY_VIT, "img_size": 64}
EXPORTED = {
    "README.md", "config.json", "model.safetensors",
    "pretraining/config.json", "pretraining/model.safetensors",
}  # fmt: skip
CONSOLE_SCRIPTS = {
    "cim-pretrain", "cim-finetune", "cim-eval", "cim-convert-dall-e", "cim-export", "cim-push",
}  # fmt: skip


def write_checkpoint(folder: Path, steps: int = 2) -> CIMForPreTraining:
    """A Trainer-like checkpoint folder of a tiny CIM after a few optimizer steps."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        model(**tiny_batch(model, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    # The Trainer's pickles sit next to the model; export must never open them.
    (folder / "optimizer.pt").write_bytes(_booby_trapped_pickle(folder / "UNPICKLED"))
    state = {"global_step": steps, "epoch": 1.0, "max_steps": steps, "train_batch_size": 4}
    state["log_history"] = [{"step": steps, "loss": 5.0}, {"step": steps, "eval_knn_top1": 0.25}]
    (folder / "trainer_state.json").write_text(json.dumps(state))
    # cim-pretrain records the resolved run configuration next to the checkpoints.
    training = TrainingArguments(
        output_dir=str(folder.parent), max_steps=steps, learning_rate=1e-3, weight_decay=0.05,
        report_to="none",
    ).to_dict()  # fmt: skip
    run_config = json.dumps({"training": training}, default=str)
    (folder.parent / "cim_pretrain_config.json").write_text(run_config)
    return model.eval()


def _booby_trapped_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded: proof that nobody unpickled it."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Checkpoint -> exported repo -> Hub cache, and the checkpoint enhancer's reference outputs."""
    root = tmp_path_factory.mktemp("hub")
    checkpoint = root / "run" / "checkpoint-2"
    model = write_checkpoint(checkpoint)
    card_data = root / "card.json"
    card_data.write_text(json.dumps({"tag": "respix_in1k", "datasets": ["imagenet-1k"]}))
    out = root / "export"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--card-data", str(card_data)]
    assert cim_export.main([*argv, "--with-pretraining"]) == 0

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.enhancer.forward_features(images)
    pooled = features[:, 1:].mean(1)  # the mean of the patch tokens after the final norm
    reference = root / "reference.safetensors"
    save_file({"images": images, "features": features, "pooled": pooled}, str(reference))

    repo_id = timm.models.get_pretrained_cfg(ENHANCER).hf_hub_id  # the default tag's repo
    cache = root / "hf-cache"
    populate_hf_cache(repo_id, out, cache)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(root / "hf-home"),
        "PYTHONPATH": "",
    }
    return dict(root=root, checkpoint=checkpoint, out=out, model=model, reference=reference,
                images=images, features=features, pooled=pooled, repo_id=repo_id, cache=cache,
                env=env)  # fmt: skip


def _run(hub, code: str, *args: str, isolated: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-I"] if isolated else []), "-c", code, *args]
    return subprocess.run(
        command, check=False, env=hub["env"], cwd=hub["root"], capture_output=True, text=True,
        timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The exported folder


def test_export_writes_one_timm_repo_that_also_carries_the_cim_config(hub):
    out = hub["out"]
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == EXPORTED
    assert not (hub["checkpoint"] / "UNPICKLED").exists()
    assert not list(out.parent.glob(".export*")), "the staging folder was left behind"
    assert hub["repo_id"] == f"{cim_models.enhancers.HF_HUB_ORGANIZATION}/{ENHANCER}.respix_in1k"

    config = json.loads((out / "config.json").read_text())
    # timm's config: a stock architecture with the sizes and the pooling, no transformers
    # model_type, so plain timm and transformers' built-in timm wrapper both build it.
    assert "model_type" not in config and "auto_map" not in config
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    model_args = config["model_args"]
    assert "num_classes" not in model_args  # TimmWrapper passes num_classes=0 itself
    assert model_args["depth"] == 2 and model_args["embed_dim"] == 64
    assert model_args["global_pool"] == "avg" and model_args["fc_norm"] is False
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["tag"] == "respix_in1k"
    assert pretrained_cfg["paper_ids"] == "arXiv:2202.03382"
    assert pretrained_cfg["input_size"] == [3, 64, 64] and pretrained_cfg["crop_pct"] == 0.9
    assert pretrained_cfg["mean"] == list(hub["model"].config.image_mean)
    # The CIMConfig, recipe included, under one key.
    cim = config["cim_config"]
    assert cim["model_type"] == "cim" and cim["enhancer"] == ENHANCER
    assert cim["enhancer_architecture"] == "vit_tiny_patch16_224" and cim["hidden_size"] == 64
    assert cim["objective"] == "respix" and cim["num_mask_patches"] == 6
    assert type(AutoConfig.from_pretrained(out)) is TimmWrapperConfig
    assert CIMConfig.from_pretrained(out).to_dict() == CIMConfig.from_dict(cim).to_dict()


def test_exported_weights_are_the_enhancer_alone_with_timm_names(hub):
    weights = load_file(hub["out"] / "model.safetensors")
    expected = hub["model"].enhancer.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    stock = timm.create_model("vit_tiny_patch16_224", num_classes=0, **ENHANCER_KWARGS)
    stock.load_state_dict(weights, strict=True)


def test_cim_classes_load_the_export_with_every_blocks_tokens(hub):
    model = CIMModel.from_pretrained(hub["out"]).eval()
    with torch.no_grad():
        outputs = model(pixel_values=hub["images"], output_hidden_states=True)
    torch.testing.assert_close(outputs.last_hidden_state, hub["features"])
    torch.testing.assert_close(outputs.pooler_output, hub["pooled"])
    assert len(outputs.hidden_states) == 1 + TINY_VIT["depth"]
    assert model.config.hidden_size == 64
    classifier = CIMForImageClassification.from_pretrained(hub["out"], num_labels=3).eval()
    with torch.no_grad():
        pooled = classifier.enhancer.forward_head(
            classifier.enhancer.forward_features(hub["images"])
        )
    torch.testing.assert_close(pooled, hub["pooled"])
    assert classifier(pixel_values=hub["images"]).logits.shape == (2, 3)


def test_pretraining_folder_continues_pretraining(hub):
    model = CIMForPreTraining.from_pretrained(hub["out"], subfolder="pretraining").eval()
    reference = hub["model"].state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("tokenizer."):
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


def test_image_processor_is_timms_eval_transform(hub):
    from PIL import Image
    from transformers import AutoImageProcessor

    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    processor = AutoImageProcessor.from_pretrained(hub["out"])
    model = timm.create_model(f"local-dir:{hub['out']}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    torch.testing.assert_close(pixel_values, transform(image).unsqueeze(0))


def test_conversion_scripts_are_the_console_commands():
    for name, module in (("export_checkpoint", cim_export), ("push_to_hub", publish)):
        spec = importlib.util.spec_from_file_location(name, REPO / "conversion" / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        assert script.main is module.main


# --------------------------------------------------------------------------------------------------
# Loading from the Hub cache, in fresh interpreters

# transformers and timm alone: a meta path finder makes `import cim_models` fail, as if the package
# were not installed, and -I keeps the working tree off sys.path.
WITHOUT_CIM_MODELS = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == "cim_models" or name.startswith("cim_models."):
            raise ImportError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
try:
    import cim_models
except ImportError:
    pass
else:
    raise AssertionError("cim_models is importable")

import numpy as np
import timm, torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                          TimmWrapperModel, pipeline)

reference, repo = load_file(sys.argv[1]), sys.argv[2]
images = reference["images"]
assert not timm.is_model("%(enhancer)s")

timm_model = timm.create_model("hf-hub:" + repo, pretrained=True).eval()
with torch.no_grad():
    torch.testing.assert_close(timm_model.forward_features(images), reference["features"])
    torch.testing.assert_close(timm_model(images), reference["pooled"])
print("ok timm hf-hub")

model = AutoModel.from_pretrained(repo).eval()
assert type(model) is TimmWrapperModel, type(model)
with torch.no_grad():
    outputs = model(pixel_values=images, output_hidden_states=True)
torch.testing.assert_close(outputs.last_hidden_state, reference["features"])
torch.testing.assert_close(outputs.pooler_output, reference["pooled"])
assert len(outputs.hidden_states) == %(depth)d
print("ok AutoModel")

classifier = AutoModelForImageClassification.from_pretrained(repo, num_labels=10).eval()
assert classifier(pixel_values=images).logits.shape == (2, 10)
torch.testing.assert_close(classifier.timm_model.forward_features(images), reference["features"])
print("ok AutoModelForImageClassification")

image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
processor = AutoImageProcessor.from_pretrained(repo)
pixel_values = processor(image, return_tensors="pt")["pixel_values"]
extractor = pipeline("image-feature-extraction", model=repo)
with torch.no_grad():
    expected = timm_model(pixel_values)
torch.testing.assert_close(torch.tensor(extractor(image, pool=True)), expected)
print("ok pipeline")
assert not any(m.split(".")[0] == "cim_models" for m in sys.modules)
print("ALL OK")
"""


def test_registered_name_hf_hub_and_cim_model_load_the_repo_and_ones_own_export(hub):
    cache = {"cache_dir": hub["cache"]}
    own_file = dict(file=str(hub["out"] / "model.safetensors"))  # one's own, unpublished export
    for name, model in (
        ("registered", timm.create_model(ENHANCER, pretrained=True, **ENHANCER_KWARGS, **cache)),
        ("hf-hub", timm.create_model(f"hf-hub:{hub['repo_id']}", pretrained=True, **cache)),
        ("file", timm.create_model(
            ENHANCER, pretrained=True, pretrained_cfg_overlay=own_file, **ENHANCER_KWARGS
        )),
    ):  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(hub["images"]), hub["pooled"], msg=name)
            torch.testing.assert_close(model.forward_features(hub["images"]), hub["features"])
    backbone = CIMModel.from_pretrained(hub["repo_id"], **cache).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(pixel_values=hub["images"]).pooler_output, hub["pooled"]
        )


def test_repo_loads_in_plain_timm_and_transformers_without_cim_models(hub):
    code = WITHOUT_CIM_MODELS % {"enhancer": ENHANCER, "depth": TINY_VIT["depth"]}
    result = _run(hub, code, str(hub["reference"]), hub["repo_id"], isolated=True)
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# Export failures: a message, exit code 1, nothing in --out


def _break_checkpoint(folder: Path, how: str) -> None:
    config_file = folder / "config.json"
    if how == "no config":
        config_file.unlink()
    elif how == "not json":
        config_file.write_text("{not json")
    elif how == "not cim":
        config_file.write_text(
            json.dumps({**json.loads(config_file.read_text()), "model_type": "vit"})
        )
    elif how == "no weights":
        (folder / "model.safetensors").unlink()
    elif how == "pickle only":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(_booby_trapped_pickle(folder / "UNPICKLED"))
    elif how == "wrong sizes":
        config = json.loads(config_file.read_text())
        config["enhancer_kwargs"]["depth"] = 3
        config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "how,message",
    [
        ("missing folder", "is not a folder"),
        ("no config", "has no config.json"),
        ("not json", "is not valid JSON"),
        ("not cim", "model_type 'vit', not 'cim'"),
        ("no weights", "has no model.safetensors"),
        ("pickle only", "only as a pickle (pytorch_model.bin)"),
        ("wrong sizes", "do not fit cim_vit_tiny_patch16_224"),
    ],
)
def test_export_refuses_a_bad_checkpoint_and_writes_nothing(hub, tmp_path, capsys, how, message):
    checkpoint = tmp_path / "checkpoint-2"
    if how != "missing folder":
        checkpoint.mkdir()
        for name in ("config.json", "model.safetensors"):
            (checkpoint / name).write_bytes((hub["checkpoint"] / name).read_bytes())
        _break_checkpoint(checkpoint, how)
    out = tmp_path / "out"
    assert cim_export.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    assert not (checkpoint / "UNPICKLED").exists()


def test_export_refuses_when_the_reloaded_repo_differs_from_the_checkpoint(
    hub, tmp_path, capsys, monkeypatch
):
    save_enhancer = cim_export.save_enhancer

    def save_perturbed_enhancer(enhancer, config, folder, *args):
        written = save_enhancer(enhancer, config, folder, *args)
        weights = load_file(folder / "model.safetensors")
        weights["norm.weight"] = weights["norm.weight"] + 0.1
        save_file(weights, str(folder / "model.safetensors"))
        return written

    monkeypatch.setattr(cim_export, "save_enhancer", save_perturbed_enhancer)
    out = tmp_path / "out"
    assert cim_export.main(["--checkpoint", str(hub["checkpoint"]), "--out", str(out)]) == 1
    assert "features differ from the checkpoint's enhancer" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_export_does_not_replace_a_non_empty_out_without_overwrite(hub, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cim_export.main(["--checkpoint", str(hub["checkpoint"]), "--out", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_refuses_card_data_it_cannot_use(hub, tmp_path, capsys):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"results": [{"task": "knn", "value": 0.5}]}))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(hub["checkpoint"]), "--out", str(out), "--card-data", str(card)]
    assert cim_export.main(argv) == 1
    assert "results[0] lacks ['dataset', 'metric']" in capsys.readouterr().err
    card.write_text("[1, 2]")
    assert cim_export.main(argv) == 1
    assert f"--card-data {card} must hold a JSON object, got list" in capsys.readouterr().err
    assert not out.exists()


def test_help_texts_name_only_the_console_commands(capsys):
    for main in (cim_export.main, publish.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert "conversion/" not in text and ".py" not in text


# --------------------------------------------------------------------------------------------------
# The model card


def _card(hub, card_data, **kwargs):
    config = hub["model"].config
    enhancer = hub["model"].enhancer
    export = json.loads((hub["out"] / "config.json").read_text())
    card = model_card.build_model_card(
        config, card_data, export, enhancer, repo_id=hub["repo_id"], **kwargs
    )
    path = hub["root"] / "README-test.md"
    card.save(path)
    return ModelCard.load(path)


def test_model_card_has_the_hub_metadata_the_recipe_and_the_plain_loading_calls(hub):
    card = ModelCard.load(hub["out"] / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["tags"][:4] == ["image-feature-extraction", "timm", "transformers", "cim"]
    assert data["license"] == "apache-2.0" and data["datasets"] == ["imagenet-1k"]
    assert "model-index" not in data and "base_model" not in data
    text = card.text
    assert "Not yet evaluated" in text
    repo = hub["repo_id"]
    assert f'timm.create_model("hf-hub:{repo}", pretrained=True)' in text
    assert f'AutoModel.from_pretrained("{repo}")' in text and "trust_remote_code" not in text
    assert f'pipeline("image-feature-extraction", model="{repo}")' in text
    assert f'CIMForPreTraining.from_pretrained("{repo}", subfolder="pretraining")' in text
    assert "mean of the patch tokens after the final norm" in text
    assert "@inproceedings{fang2023corrupted" in text and "arxiv.org/abs/2202.03382" in text
    for note in ("SPEC", "DESIGN", "STYLE", "shared/", "notes"):
        assert note not in card.content, note
    # The CIM settings: a value equal to its default is marked, the others are not; once each.
    assert "| masked patches per image | `6` | 75 [ours, BEiT's value] |" in text
    assert "| generator layer scale | `0.1` (default) | 0.1 [paper, BEiT] |" in text
    assert text.count("masked patches per image") == 1 and text.count("| weight_decay |") == 1
    # The optimisation recipe the run recorded and its training state.
    assert "| max_steps | `2` |" in text and "| epochs | not recorded (reference: 300) |" in text
    assert "| weight_decay | `0.05` (default) |" in text
    assert "| optimizer | `adamw_torch_fused` (default) |" in text
    assert "| max_grad_norm | `1.0` (reference: 3.0) |" in text
    assert "| precision | `fp32` (reference: bf16) |" in text
    assert (
        "step 2 of 2" in text and "kNN monitor top-1 0.25 on the run's eval set at step 2" in text
    )
    registered = f'timm.create_model("{ENHANCER}.respix_in1k", pretrained=True, depth=2'
    assert registered in text


def test_model_card_reports_only_the_results_it_was_given(hub):
    no_results = _card(hub, {"datasets": ["imagenet-1k"]})
    assert "Not yet evaluated" in no_results.text
    assert "%" not in no_results.text
    assert "83.3" not in no_results.content and "80.6" not in no_results.content  # the paper's

    given = {
        "task": "image-classification", "protocol": "linear probe, 10 epochs",
        "dataset": "imagenet-1k", "dataset_name": "ImageNet-1K", "split": "validation",
        "metric": "accuracy", "metric_name": "top-1 accuracy", "value": 12.34,
        "source": "this project's eval script",
    }  # fmt: skip
    card = _card(hub, {"datasets": ["imagenet-1k"], "results": [given], "base_model": "org/parent"})
    assert "Not yet evaluated" not in card.text
    row = (
        "| image-classification | linear probe, 10 epochs | ImageNet-1K | validation "
        "| top-1 accuracy | 12.34 |"
    )
    assert row in card.text
    results = card.data.eval_results
    assert [(r.task_type, r.dataset_type, r.metric_type, r.metric_value) for r in results] == [
        ("image-classification", "imagenet-1k", "accuracy", 12.34)
    ]
    assert card.data.base_model == "org/parent"


def test_model_card_takes_the_numbers_of_eval_results_files(hub, tmp_path):
    from cim_models.evaluation.results import build_results, write_results

    dataset = {"name": "synthetic-shapes", "source": "built-in", "train_split": "train",
               "split": "validation", "num_classes": 10}  # fmt: skip
    files = [
        write_results(
            build_results(
                task, protocol, "run", "/run", dataset, metrics, {"k": 20}, 300, 100, 1.0
            ),
            tmp_path / task,
        )
        for task, protocol, metrics in (
            ("knn", "kNN (k=20, T=0.07)", {"top1": 0.4567, "top5": 0.9}),
            ("finetune", "fine-tuning, tiny preset", {"top1": 0.8123, "top5": 0.99}),
        )
    ]
    card = model_card.read_card_data(files)
    text = _card(hub, {**card, "datasets": ["synthetic-shapes"]}).text
    for path in files:
        saved = json.loads(path.read_text())
        for value in saved["metrics"].values():
            assert f"| {saved['protocol']} | synthetic-shapes | validation |" in text
            assert f"| {value} |" in text
    values = sorted(r.metric_value for r in _card(hub, card).data.eval_results)
    assert values == sorted(v for p in files for v in json.loads(p.read_text())["metrics"].values())


def test_model_card_marks_the_reference_training_recipe_as_default(hub):
    training = {"epochs": 300, "global_batch_size": 1024, "learning_rate": 7.5e-4,
                "precision": "fp16"}  # fmt: skip
    text = _card(hub, {"training": training}).text
    assert "| epochs | `300` (default) |" in text
    assert "| learning_rate | `0.00075` (default) |" in text  # 1.5e-3 scaled linearly to 1024
    assert "| precision | `fp16` (reference: bf16) |" in text
    assert "| weight_decay | not recorded (reference: 0.05) |" in text


def test_model_card_template_can_be_replaced(hub, tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} for {{ repo_id }}\n")
    card = _card(hub, {"model_name": "mine"}, template=template)
    assert card.text.strip() == f"# mine for {hub['repo_id']}"
    assert card.data.library_name == "timm"


def test_the_wheel_ships_the_card_template_and_every_console_command(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "cim_models", source / "cim_models", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(source)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = wheels.glob("cim_models-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        template = archive.read("cim_models/hub/model_card_template.md").decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode().split("[console_scripts]")[1]
    assert template == model_card.TEMPLATE.read_text()
    declared = {line.split("=")[0].strip() for line in scripts.splitlines() if "=" in line}
    assert declared >= CONSOLE_SCRIPTS
    assert "cim-export = cim_models.hub.export:main" in scripts
    assert "cim-push = cim_models.hub.publish:main" in scripts


# --------------------------------------------------------------------------------------------------
# Publishing


class FakeApi:
    """HfApi's create_repo / create_branch / upload_folder, recorded instead of sent."""

    calls: ClassVar[list] = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        pr_url = "https://hub.test/discussions/7" if kwargs.get("create_pr") else None
        return type("Commit", (), {"commit_url": "https://hub.test/commit/1", "pr_url": pr_url})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(publish, "HfApi", FakeApi)
    monkeypatch.setattr(publish, "get_token", lambda: "hf_test")
    return FakeApi.calls


def test_push_dry_run_lists_exactly_the_files_and_sizes_without_network(hub, capsys, fake_hub):
    argv = ["--folder", str(hub["out"]), "--repo-id", "cim-models/test", "--private", "--dry-run"]
    assert publish.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Would upload 5 files")
    assert "cim-models/test (revision main, private)" in lines[0]
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[1:]}
    assert set(listed) == EXPORTED
    size = (hub["out"] / "config.json").stat().st_size
    assert listed["config.json"] == f"{size} B" or listed["config.json"].endswith("KB")
    assert fake_hub == []  # no HfApi was even created


def test_push_creates_the_repo_and_uploads_the_listed_files(hub, capsys, fake_hub):
    argv = ["--folder", str(hub["out"]), "--repo-id", "cim-models/test", "--revision", "v1",
            "--private"]  # fmt: skip
    assert publish.main(argv) == 0
    assert "Published: https://hub.test/commit/1" in capsys.readouterr().out
    assert fake_hub[:3] == [
        ("init", "hf_test"),
        ("create_repo", "cim-models/test", True, True),
        ("create_branch", "cim-models/test", "v1"),
    ]
    upload = fake_hub[3][1]
    assert upload["repo_id"] == "cim-models/test" and upload["revision"] == "v1"
    assert upload["create_pr"] is False and Path(upload["folder_path"]) == hub["out"]
    assert set(upload["allow_patterns"]) == EXPORTED


def test_push_create_pr_opens_a_pull_request_and_creates_nothing(hub, capsys, fake_hub):
    argv = ["--folder", str(hub["out"]), "--repo-id", "someone/else", "--create-pr",
            "--revision", "dev"]  # fmt: skip
    assert publish.main(argv) == 0
    out = capsys.readouterr().out
    assert "(a pull request against dev)" in out
    assert "Opened pull request: https://hub.test/discussions/7" in out
    assert [call[0] for call in fake_hub] == ["init", "upload_folder"]
    upload = fake_hub[1][1]
    assert upload["create_pr"] is True and upload["revision"] == "dev"


def test_push_without_network_fails_with_a_clear_message(hub, capsys, monkeypatch):
    monkeypatch.setattr(publish, "get_token", lambda: "hf_test")
    argv = ["--folder", str(hub["out"]), "--repo-id", "cim-models/test"]
    assert publish.main(argv) == 1  # the tests run with HF_HUB_OFFLINE=1
    assert "offline mode is enabled (HF_HUB_OFFLINE=1)" in capsys.readouterr().err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert publish.main(argv) == 1
    assert "Could not reach the Hub at http://127.0.0.1:9" in capsys.readouterr().err


def test_push_without_token_says_how_to_log_in(hub, capsys, monkeypatch):
    monkeypatch.setattr(publish, "get_token", lambda: None)
    assert publish.main(["--folder", str(hub["out"]), "--repo-id", "cim-models/test"]) == 1
    err = capsys.readouterr().err
    assert "hf auth login" in err and "HF_TOKEN" in err


def test_push_refuses_a_folder_that_is_not_an_export_or_holds_pickles(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert publish.main(["--folder", str(tmp_path), "--repo-id", "a/b", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "lacks model.safetensors, README.md" in err and "cim-export --checkpoint" in err
    for name in ("model.safetensors", "README.md", "optimizer.pt"):
        (tmp_path / name).write_text("x")
    assert publish.main(["--folder", str(tmp_path), "--repo-id", "a/b", "--dry-run"]) == 1
    assert "holds pickles (optimizer.pt)" in capsys.readouterr().err
    assert publish.main(["--folder", str(tmp_path), "--repo-id", "not-a-repo-id"]) == 1
    assert "--repo-id must be ORG/NAME, got 'not-a-repo-id'" in capsys.readouterr().err
