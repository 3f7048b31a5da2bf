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
    assert (
        alias.hf_hub_id
        == full.hf_hub_id
        == f"{HF_HUB_ORGANIZATION}/cim_vit_base_patch16_224.respix_in1k"
    )


@pytest.mark.parametrize("name", REGISTERED)
def test_state_dict_has_the_stock_layout(name):
    # Built on the meta device: the full-size parameters need not be allocated to compare layouts.
    with torch.device("meta"):
        cim = timm.create_model(name)
        stock = timm.create_model(STOCK_ARCHITECTURES[name], num_classes=0)
    shapes = {k: v.shape for k, v in cim.state_dict().items()}
    assert shapes == {k: v.shape for k, v in stock.state_dict().items()}


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cim_vit_small_patch16_224", dict(depth=1, img_size=64)),
        ("cim_vit_base", dict(depth=1, img_size=64)),
        ("cim_resnet50", dict(layers=(1, 1, 1, 1))),
    ],
)
def test_weights_load_strictly_into_stock_timm_and_outputs_match(name, kwargs):
    torch.manual_seed(0)
    cim = timm.create_model(name, **kwargs).eval()
    stock = timm.create_model(STOCK_ARCHITECTURES[name], num_classes=0, **kwargs).eval()
    stock.load_state_dict(cim.state_dict(), strict=True)
    if "vit" in name:  # stock timm pools the same way with the model_args of an export
        pooling = dict(global_pool="avg", fc_norm=False)
        stock = timm.create_model(STOCK_ARCHITECTURES[name], num_classes=0, **pooling, **kwargs)
        stock.eval().load_state_dict(cim.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(stock.forward_features(x), cim.forward_features(x))
        torch.testing.assert_close(stock(x), cim(x))


@pytest.mark.parametrize("name", ["cim_vit_tiny_patch16_224", "cim_vit_small"])
def test_vit_enhancers_pool_the_mean_of_the_patch_tokens_after_the_final_norm(name):
    # CIM's losses reach the patch tokens only: the class token is never trained.
    model = timm.create_model(name, depth=2, img_size=64).eval()
    assert model.global_pool == "avg"
    assert isinstance(model.fc_norm, torch.nn.Identity)
    assert not isinstance(model.norm, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (2, 1 + 16, D), after the final norm
        torch.testing.assert_close(model(x), tokens[:, model.num_prefix_tokens :].mean(1))
        assert not torch.allclose(model(x), tokens[:, 0])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cim_vit_tiny_patch16_224", dict(depth=4, img_size=64)),
        ("cim_resnet50", dict(layers=(1, 1, 1, 1))),
    ],
)
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


def test_unpublished_pretrained_weights_say_so_and_how_to_load_ones_own_export():
    # The tests run offline (HF_HUB_OFFLINE=1) with an empty Hub cache: no CIM repo is reachable.
    with pytest.raises(OSError) as info:
        timm.create_model("cim_vit_tiny_patch16_224.revdet_in1k", pretrained=True, depth=1)
    message = str(info.value)
    repo = f"{HF_HUB_ORGANIZATION}/cim_vit_tiny_patch16_224.revdet_in1k"
    assert f"repo '{repo}' is not published yet" in message
    assert (
        "cim-export --checkpoint" in message
        and f"cim-push --folder DIR --repo-id {repo}" in message
    )
    assert "pretrained_cfg_overlay=dict(file='DIR/model.safetensors')" in message
    assert "timm.create_model('local-dir:DIR', pretrained=True)" in message
    assert "HF_ENDPOINT" in message
    assert "conversion/" not in message and ".py" not in message
