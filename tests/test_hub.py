"""Hub packaging: export a checkpoint, load the repo through every library path offline, publish it.

One tiny CIM (ViT enhancer, 64px) is trained for two steps and saved like a Trainer checkpoint, then
exported with conversion/export_checkpoint.py and put into a hand-built Hub cache under the repo id
that timm's registry gives ``cim_vit_tiny_patch16_224``. Fresh interpreters (``HF_HUB_OFFLINE=1``)
then load it through timm and transformers, with and without cim_models importable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

import cim_models
from cim_models import CIMForPreTraining
from tests.hub_cache import populate_hf_cache
from tests.tiny import TINY_VIT, tiny_batch, tiny_model

REPO = Path(__file__).resolve().parents[1]
ENHANCER = "cim_vit_tiny_patch16_224"
# What the registered name needs besides pretrained=True to build the tiny architecture.
ENHANCER_KWARGS = {**TINY_VIT, "img_size": 64}
EXPORTED_FILES = {
    "README.md", "config.json", "preprocessor_config.json", "model.safetensors",
    "configuration_cim.py", "modeling_cim.py",
}
EXPORTED_WITH_PRETRAINING = EXPORTED_FILES | {"pretraining/config.json", "pretraining/model.safetensors"}


def _load_script(name):
    # conversion/ is a folder of scripts, not a package: import the file by path.
    spec = importlib.util.spec_from_file_location(name, REPO / "conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


export_checkpoint = _load_script("export_checkpoint")
push_to_hub = _load_script("push_to_hub")


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
    ).to_dict()
    run_config = json.dumps({"training": training}, default=str)
    (folder.parent / "cim_pretrain_config.json").write_text(run_config)
    return model.eval()


def _booby_trapped_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded: proof that nobody unpickled it."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Checkpoint -> exported repo -> Hub cache, plus the checkpoint enhancer's reference outputs."""
    root = tmp_path_factory.mktemp("hub")
    checkpoint = root / "run" / "checkpoint-2"
    model = write_checkpoint(checkpoint)
    card_data = root / "card.json"
    card_data.write_text(json.dumps({"tag": "respix_in1k", "datasets": ["imagenet-1k"]}))
    out = root / "export"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--card-data", str(card_data)]
    assert export_checkpoint.main([*argv, "--with-pretraining"]) == 0

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.enhancer.forward_features(images)
        pooled = model.enhancer.forward_head(features, pre_logits=True)
    reference = root / "reference.safetensors"
    save_file({"images": images, "features": features, "pooled": pooled.contiguous()}, str(reference))

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
                repo_id=repo_id, cache=cache, env=env)


# ---------------------------------------------------------------------------------------------------
# The exported folder


def test_export_writes_one_repo_for_both_libraries(hub):
    out = hub["out"]
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == EXPORTED_WITH_PRETRAINING
    assert not (hub["checkpoint"] / "UNPICKLED").exists()
    assert not list(out.parent.glob(".export*")), "the staging folder was left behind"
    assert hub["repo_id"] == f"{cim_models.enhancers.HF_HUB_ORGANIZATION}/{ENHANCER}.respix_in1k"

    config = json.loads((out / "config.json").read_text())
    # timm's half: a stock architecture + sizes, so plain timm (and TimmWrapper) can build it.
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 0 and "num_classes" not in config["model_args"]
    assert config["model_args"]["depth"] == 2 and config["model_args"]["embed_dim"] == 64
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["tag"] == "respix_in1k" and pretrained_cfg["paper_ids"] == "arXiv:2202.03382"
    assert pretrained_cfg["input_size"] == [3, 64, 64] and pretrained_cfg["crop_pct"] == 0.9
    assert pretrained_cfg["mean"] == list(hub["model"].config.image_mean)
    # transformers' half.
    assert config["model_type"] == "cim" and config["architectures"] == ["CIMModel"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cim.CIMConfig",
        "AutoModel": "modeling_cim.CIMModel",
        "AutoModelForImageClassification": "modeling_cim.CIMForImageClassification",
    }
    assert config["enhancer"] == ENHANCER and config["enhancer_architecture"] == "vit_tiny_patch16_224"
    assert config["objective"] == "respix" and config["num_mask_patches"] == 6  # the recipe travels along


def test_exported_weights_are_the_enhancer_alone_with_timm_names(hub):
    weights = load_file(hub["out"] / "model.safetensors")
    expected = hub["model"].enhancer.state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    with safe_open(hub["out"] / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_pretraining_folder_continues_pretraining(hub):
    model = CIMForPreTraining.from_pretrained(hub["out"] / "pretraining").eval()
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


# ---------------------------------------------------------------------------------------------------
# Loading from the Hub cache, in fresh interpreters

FRESH_PROCESS_CHECKS = """
import json, sys
import timm, torch
import cim_models
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

reference, repo, kwargs = load_file(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
images = reference["images"]

def check(name, features, pooled):
    torch.testing.assert_close(features, reference["features"], msg=name)
    torch.testing.assert_close(pooled, reference["pooled"], msg=name)
    print("ok", name)

def timm_outputs(model):
    with torch.no_grad():
        features = model.eval().forward_features(images)
        return features, model.forward_head(features, pre_logits=True)

check("registered name", *timm_outputs(timm.create_model("%(enhancer)s", pretrained=True, **kwargs)))
check("hf-hub", *timm_outputs(timm.create_model("hf-hub:" + repo, pretrained=True)))
stock = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
stock.load_state_dict(load_file(hf_hub_download(repo, "model.safetensors")), strict=True)
check("stock vit_tiny_patch16_224", *timm_outputs(stock))

model = AutoModel.from_pretrained(repo).eval()
assert type(model) is cim_models.CIMModel, type(model)
with torch.no_grad():
    outputs = model(pixel_values=images)
check("AutoModel", outputs.last_hidden_state, outputs.pooler_output)

classifier = AutoModelForImageClassification.from_pretrained(repo, num_labels=10).eval()
assert type(classifier) is cim_models.CIMForImageClassification, type(classifier)
assert classifier(pixel_values=images).logits.shape == (2, 10)
check("AutoModelForImageClassification backbone", *timm_outputs(classifier.enhancer))

processor = AutoImageProcessor.from_pretrained(repo)
assert processor.data_config["input_size"] == (3, 64, 64) and processor.data_config["crop_pct"] == 0.9
print("ALL OK")
"""

WITHOUT_CIM_MODELS_CHECKS = """
import sys
sys.modules["cim_models"] = None  # as if cim-models were not installed
try:
    import cim_models
except ImportError:
    pass
else:
    raise AssertionError("cim_models is importable")

import timm, torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

reference, repo = load_file(sys.argv[1]), sys.argv[2]
images = reference["images"]
assert not timm.is_model("%(enhancer)s")

model = timm.create_model("hf-hub:" + repo, pretrained=True).eval()
with torch.no_grad():
    features = model.forward_features(images)
torch.testing.assert_close(features, reference["features"])
print("ok timm hf-hub")

try:
    AutoModel.from_pretrained(repo)
except ValueError as err:
    assert "trust_remote_code=True" in str(err), err
else:
    raise AssertionError("custom code ran without trust_remote_code")

model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    outputs = model(pixel_values=images)
torch.testing.assert_close(outputs.last_hidden_state, reference["features"])
torch.testing.assert_close(outputs.pooler_output, reference["pooled"])
print("ok AutoModel remote code")

classifier = AutoModelForImageClassification.from_pretrained(repo, num_labels=10, trust_remote_code=True)
assert type(classifier).__name__ == "CIMForImageClassification"
assert classifier(pixel_values=images).logits.shape == (2, 10)
AutoImageProcessor.from_pretrained(repo)
assert "cim_models" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
print("ALL OK")
"""


def test_repo_loads_offline_through_timm_and_transformers_in_a_fresh_process(hub):
    code = FRESH_PROCESS_CHECKS % {"enhancer": ENHANCER}
    args = [str(hub["reference"]), hub["repo_id"], json.dumps(ENHANCER_KWARGS)]
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=hub["env"], cwd=hub["root"], capture_output=True,
        text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stdout + result.stderr


def test_repo_loads_with_trust_remote_code_where_cim_models_is_not_importable(hub):
    code = WITHOUT_CIM_MODELS_CHECKS % {"enhancer": ENHANCER}
    result = subprocess.run(
        [sys.executable, "-c", code, str(hub["reference"]), hub["repo_id"]], env=hub["env"],
        cwd=hub["root"], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# Export failures: a message, exit code 1, nothing in --out


def _break_checkpoint(folder: Path, how: str) -> None:
    if how == "no config":
        (folder / "config.json").unlink()
    elif how == "not json":
        (folder / "config.json").write_text("{not json")
    elif how == "not cim":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    elif how == "no weights":
        (folder / "model.safetensors").unlink()
    elif how == "pickle only":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(_booby_trapped_pickle(folder / "UNPICKLED"))
    elif how == "wrong sizes":
        config = json.loads((folder / "config.json").read_text())
        config["enhancer_kwargs"]["depth"] = 3
        (folder / "config.json").write_text(json.dumps(config))


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
    assert export_checkpoint.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    assert not (checkpoint / "UNPICKLED").exists()


def test_export_refuses_when_the_reloaded_repo_differs_from_the_checkpoint(hub, tmp_path, capsys, monkeypatch):
    write_weights = export_checkpoint.write_weights

    def write_perturbed_weights(enhancer, folder):
        write_weights(enhancer, folder)
        weights = load_file(folder / "model.safetensors")
        weights["norm.weight"] = weights["norm.weight"] + 0.1
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(export_checkpoint, "write_weights", write_perturbed_weights)
    out = tmp_path / "out"
    assert export_checkpoint.main(["--checkpoint", str(hub["checkpoint"]), "--out", str(out)]) == 1
    assert "differ from the checkpoint's enhancer" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_export_does_not_replace_a_non_empty_out_without_overwrite(hub, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_checkpoint.main(["--checkpoint", str(hub["checkpoint"]), "--out", str(out)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------------
# The model card


def _card(hub, card_data):
    config = hub["model"].config
    enhancer = hub["model"].enhancer
    export = json.loads((hub["out"] / "config.json").read_text())
    card = export_checkpoint.build_model_card(config, card_data, export, enhancer, repo_id=hub["repo_id"])
    path = hub["root"] / "README-test.md"
    card.save(path)
    return ModelCard.load(path)


def test_model_card_has_the_hub_metadata_and_parses(hub):
    card = ModelCard.load(hub["out"] / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert data["tags"][:4] == ["image-feature-extraction", "timm", "transformers", "cim"]
    assert data["license"] == "apache-2.0" and data["datasets"] == ["imagenet-1k"]
    assert "model-index" not in data and "base_model" not in data
    text = card.text
    assert "Not yet evaluated" in text
    assert f'timm.create_model("hf-hub:{hub["repo_id"]}", pretrained=True)' in text
    assert f'AutoModel.from_pretrained("{hub["repo_id"]}", trust_remote_code=True)' in text
    assert "@inproceedings{fang2023corrupted" in text and "pretraining/" in text
    # The recipe: every value equal to its project default is marked, the others are not.
    assert "| masked patches per image | `6` | 75 [ours, BEiT's value] |" in text
    assert "| generator layer scale | `0.1` (default) | 0.1 [paper, BEiT] |" in text
    # The optimisation recipe the run recorded (cim_pretrain_config.json) and its training state.
    assert "| max_steps | `2` |" in text and "| epochs | not recorded (SPEC.md: 300) |" in text
    assert "| weight_decay | `0.05` (default) |" in text
    assert "| optimizer | `adamw_torch_fused` (default) |" in text
    assert "| max_grad_norm | `1.0` (SPEC.md: 3.0) |" in text
    assert "| precision | `fp32` (SPEC.md: bf16) |" in text
    assert "step 2 of 2" in text and "kNN monitor top-1 0.25 on the run's eval set at step 2" in text


def test_model_card_reports_only_the_results_it_was_given(hub):
    no_results = _card(hub, {"datasets": ["imagenet-1k"]})
    assert "Not yet evaluated" in no_results.text
    assert "%" not in no_results.text
    assert "83.3" not in no_results.content and "80.6" not in no_results.content  # the paper's numbers

    given = {
        "task": "image-classification", "protocol": "linear probe, 10 epochs", "dataset": "imagenet-1k",
        "dataset_name": "ImageNet-1K", "split": "validation", "metric": "accuracy",
        "metric_name": "top-1 accuracy", "value": 12.34, "source": "this project's eval script",
    }
    card = _card(hub, {"datasets": ["imagenet-1k"], "results": [given], "base_model": "org/parent"})
    assert "Not yet evaluated" not in card.text
    row = "| image-classification | linear probe, 10 epochs | ImageNet-1K | validation | top-1 accuracy | 12.34 |"
    assert row in card.text
    results = card.data.eval_results
    assert [(r.task_type, r.dataset_type, r.metric_type, r.metric_value) for r in results] == [
        ("image-classification", "imagenet-1k", "accuracy", 12.34)
    ]
    assert card.data.base_model == "org/parent"


def test_model_card_takes_the_numbers_of_eval_results_files(hub, tmp_path):
    from cim_models.evaluation.results import build_results, write_results

    dataset = {"name": "synthetic-shapes", "source": "built-in", "train_split": "train", "split": "validation",
               "num_classes": 10}
    files = [
        write_results(build_results(task, protocol, "run", "/run", dataset, metrics, {"k": 20}, 300, 100, 1.0),
                      tmp_path / task)
        for task, protocol, metrics in (
            ("knn", "kNN (k=20, T=0.07)", {"top1": 0.4567, "top5": 0.9}),
            ("finetune", "fine-tuning, tiny preset", {"top1": 0.8123, "top5": 0.99}),
        )
    ]
    card = export_checkpoint.read_card_data(files)
    text = _card(hub, {**card, "datasets": ["synthetic-shapes"]}).text
    for path in files:
        saved = json.loads(path.read_text())
        for value in saved["metrics"].values():
            assert f"| {saved['protocol']} | synthetic-shapes | validation |" in text
            assert f"| {value} |" in text
    values = sorted(r.metric_value for r in _card(hub, card).data.eval_results)
    assert values == sorted(v for p in files for v in json.loads(p.read_text())["metrics"].values())


def test_model_card_marks_a_spec_training_recipe_as_default(hub):
    training = {"epochs": 300, "global_batch_size": 1024, "learning_rate": 7.5e-4, "precision": "fp16"}
    text = _card(hub, {"training": training}).text
    assert "| epochs | `300` (default) |" in text
    assert "| learning_rate | `0.00075` (default) |" in text  # 1.5e-3 scaled linearly to batch 1024
    assert "| precision | `fp16` (SPEC.md: bf16) |" in text
    assert "| weight_decay | not recorded (SPEC.md: 0.05) |" in text


# ---------------------------------------------------------------------------------------------------
# Publishing


def _push(hub, *args, **env):
    script = REPO / "conversion" / "push_to_hub.py"
    return subprocess.run(
        [sys.executable, str(script), "--folder", str(hub["out"]), "--repo-id", "cim-models/test", *args],
        env={**hub["env"], **env}, cwd=hub["root"], capture_output=True, text=True, timeout=60,
    )


def test_push_dry_run_lists_exactly_the_files_and_needs_no_network(hub):
    result = _push(hub, "--private", "--dry-run", HF_TOKEN="")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Would upload 8 files") and "cim-models/test (revision main, private)" in lines[0]
    assert {line.split()[0] for line in lines[1:]} == EXPORTED_WITH_PRETRAINING


def test_push_without_network_fails_with_a_clear_message(hub):
    offline = _push(hub, HF_TOKEN="hf_test")
    assert offline.returncode == 1
    assert "offline mode is enabled (HF_HUB_OFFLINE=1)" in offline.stderr
    assert "Traceback" not in offline.stderr

    unreachable = _push(hub, HF_TOKEN="hf_test", HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert unreachable.returncode == 1
    assert "Could not reach the Hub at http://127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_push_without_token_says_how_to_log_in(hub):
    result = _push(hub, HF_TOKEN="", HF_HOME=str(hub["root"] / "no-token-home"))
    assert result.returncode == 1
    assert "hf auth login" in result.stderr and "HF_TOKEN" in result.stderr


def test_push_creates_the_repo_and_uploads_the_listed_files(hub, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": "https://hub.test/commit/1"})()

    monkeypatch.setattr(push_to_hub, "HfApi", FakeApi)
    monkeypatch.setattr(push_to_hub, "get_token", lambda: "hf_test")
    argv = ["--folder", str(hub["out"]), "--repo-id", "cim-models/test", "--revision", "v1", "--private"]
    assert push_to_hub.main(argv) == 0
    assert "Published: https://hub.test/commit/1" in capsys.readouterr().out
    assert calls[:3] == [
        ("init", "hf_test"),
        ("create_repo", "cim-models/test", True, True),
        ("create_branch", "cim-models/test", "v1"),
    ]
    upload = calls[3][1]
    assert upload["repo_id"] == "cim-models/test" and upload["revision"] == "v1"
    assert Path(upload["folder_path"]) == hub["out"]
    assert set(upload["allow_patterns"]) == EXPORTED_WITH_PRETRAINING


def test_push_refuses_a_folder_that_is_not_an_export_or_holds_pickles(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert push_to_hub.main(["--folder", str(tmp_path), "--repo-id", "a/b", "--dry-run"]) == 1
    assert "lacks model.safetensors, README.md" in capsys.readouterr().err
    for name in ("model.safetensors", "README.md", "optimizer.pt"):
        (tmp_path / name).write_text("x")
    assert push_to_hub.main(["--folder", str(tmp_path), "--repo-id", "a/b", "--dry-run"]) == 1
    assert "holds pickles (optimizer.pt)" in capsys.readouterr().err
