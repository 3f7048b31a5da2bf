import pytest
import timm
import torch

import cim_models  # noqa: F401  (registers the cim_* models)
from cim_models.enhancers import HF_HUB_ORGANIZATION, STOCK_ARCHITECTURES

REGISTERED = [
    "cim_vit_small_patch16_224",
    "cim_vit_base_patch16_224",
    "cim_vit_large_patch16_224",
    "cim_resnet50",
    "cim_vit_small",
    "cim_vit_base",
    "cim_vit_large",
]


def test_every_enhancer_is_registered_with_pretrained_tags():
    assert set(REGISTERED) <= set(timm.list_models("cim_*"))
    pretrained = set(timm.list_pretrained("cim_*"))
    for name in REGISTERED:
        assert {f"{name}.respix_in1k", f"{name}.revdet_in1k"} <= pretrained


@pytest.mark.parametrize("name", ["cim_vit_base", "cim_resnet50"])
def test_pretrained_cfg_is_timm_style(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.paper_ids == "arXiv:2202.03382"
    assert cfg.num_classes == 0 and cfg.license and cfg.mean and cfg.std
    assert cfg.hf_hub_id.startswith(f"{HF_HUB_ORGANIZATION}/")
    assert cfg.tag == "respix_in1k"  # the default tag pretrained=True resolves to


def test_aliases_point_at_the_same_repo():
    alias = timm.models.get_pretrained_cfg("cim_vit_base")
    full = timm.models.get_pretrained_cfg("cim_vit_base_patch16_224")
    assert alias.hf_hub_id == full.hf_hub_id == f"{HF_HUB_ORGANIZATION}/cim_vit_base_patch16_224.respix_in1k"


@pytest.mark.parametrize(
    "name,kwargs,input_size",
    [
        ("cim_vit_small_patch16_224", {}, 224),
        ("cim_vit_base", {}, 224),
        ("cim_resnet50", {}, 128),
    ],
)
def test_state_dict_loads_strictly_into_stock_timm_and_outputs_match(name, kwargs, input_size):
    torch.manual_seed(0)
    cim = timm.create_model(name, **kwargs).eval()
    stock = timm.create_model(STOCK_ARCHITECTURES[name], num_classes=0, **kwargs).eval()
    stock.load_state_dict(cim.state_dict(), strict=True)
    x = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        torch.testing.assert_close(stock(x), cim(x))


def test_large_variant_has_the_stock_layout():
    # Built on the meta device: ViT-L's 300M parameters need not be allocated to compare names and shapes.
    with torch.device("meta"):
        cim = timm.create_model("cim_vit_large_patch16_224")
        stock = timm.create_model("vit_large_patch16_224", num_classes=0)
    assert {k: v.shape for k, v in cim.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}


@pytest.mark.parametrize("name,kwargs", [("cim_vit_tiny_patch16_224", dict(depth=4, img_size=64)), ("cim_resnet50", {})])
def test_features_only_and_forward_intermediates_work_like_stock(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    features = timm.create_model(name, features_only=True, **kwargs).eval()(x)
    assert len(features) >= 3 and all(f.ndim == 4 for f in features)
    final, intermediates = model.forward_intermediates(x)
    assert len(intermediates) >= 4 and all(t.ndim == 4 for t in intermediates)
    torch.testing.assert_close(model.forward_head(final, pre_logits=True), model(x))


def test_registered_model_rejects_unknown_name():
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("cim_vit_gigantic")


def test_unreachable_pretrained_weights_name_the_repo_and_the_ways_out():
    # The tests run offline with an empty Hub cache, so no CIM repo can be reached.
    with pytest.raises(OSError) as info:
        timm.create_model("cim_vit_tiny_patch16_224.revdet_in1k", pretrained=True, depth=1)
    message = str(info.value)
    assert f"'{HF_HUB_ORGANIZATION}/cim_vit_tiny_patch16_224.revdet_in1k'" in message
    assert "push_to_hub.py" in message and "pretrained_cfg_overlay=dict(file=" in message
