"""Two heads over one backbone: the score head gives the image score, the map head the anomaly map, each with its
own subspaces. What holds: each head equals its own single-head detector; with tiling, the detector equals one fitted
on the tiles as images; with a second map pass, one fitted on the larger images; non-square inputs keep their shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fre_torch import DetectorConfig, FREDetector, run
from fre_torch.detection.detector import DEFAULT_DETAIL_LAYERS, DEFAULT_MAP_LAYERS, with_detail_for
from fre_torch.features import ImageDataset, get_backbone_spec, list_backbones

SIZE = 64
LITE = "efficientnet_lite0"


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random textures (uint8), so the subspaces have a real spectrum to cut."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(h // 8, 1), max(w // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (255 * (0.8 * x + 0.2 * torch.rand(n, 3, h, w, generator=g))).to(torch.uint8)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return _images(24, SIZE, SIZE, 0), _images(6, SIZE, SIZE, 1)


@pytest.mark.full
def test_each_head_equals_its_single_head_detector(data) -> None:
    train, test = data
    cfg = DetectorConfig(LITE, input_size=SIZE, detail_layers=None)  # the detail head: the next test
    both = FREDetector(cfg).fit(train)
    score_only = FREDetector(DetectorConfig(LITE, input_size=SIZE, layers=cfg.layers, map_layers=None)).fit(train)
    map_only = FREDetector(DetectorConfig(LITE, input_size=SIZE, layers=cfg.map_layers, pool=cfg.map_pool,
                                          map_layers=None)).fit(train)
    scores, maps = both.anomaly_maps(test)
    torch.testing.assert_close(scores, score_only.score(test), rtol=1e-6, atol=0)
    torch.testing.assert_close(maps, map_only.anomaly_maps(test)[1], rtol=1e-6, atol=0)
    assert maps.shape == (6, *cfg.map_grid) == (6, 4, 4)  # blocks.4: stride 8 -> 8 x 8, pooled by 2
    # The score is no longer the map's sum; it is made from the score head's own cells.
    assert not torch.allclose(maps.sum(dim=(1, 2)), scores, rtol=1e-2)
    feats = both.features(test)
    torch.testing.assert_close(both.score_from_cells(both.head_maps(feats, "score", stitched=False)), scores,
                               rtol=1e-5, atol=1e-6)


def test_detail_map_is_the_geometric_mean_of_two_single_head_maps(data) -> None:
    """With the detail head (the default), the map is sqrt(coarse upsampled bilinear x fine), where coarse is the map
    head's map and fine the detail head's, each equal to a single-head detector fitted alone on the same images."""
    train, test = data
    # Asked for by name: the images are no larger than the input, so the default head would be left out at fit.
    cfg = DetectorConfig(LITE, input_size=SIZE, detail_layers=DEFAULT_DETAIL_LAYERS[LITE])
    assert cfg.detail_layers == DEFAULT_DETAIL_LAYERS[LITE] and cfg.map_grid == (8, 8) == cfg.detail_head.grid
    det = FREDetector(cfg).fit(train)
    coarse_only = FREDetector(DetectorConfig(LITE, input_size=SIZE, layers=cfg.map_layers, pool=cfg.map_pool,
                                             map_layers=None)).fit(train)
    fine_only = FREDetector(DetectorConfig(LITE, input_size=SIZE, layers=cfg.detail_layers, pool=cfg.detail_pool,
                                           map_layers=None)).fit(train)
    _, coarse = coarse_only.anomaly_maps(test)
    _, fine = fine_only.anomaly_maps(test)
    assert coarse.shape == (6, 4, 4) and fine.shape == (6, 8, 8)
    up = torch.nn.functional.interpolate(coarse.double()[:, None], size=(8, 8), mode="bilinear",
                                         align_corners=False)[:, 0]
    want = (up * fine.double()).sqrt()
    scores, maps = det.anomaly_maps(test)
    torch.testing.assert_close(maps.double(), want, rtol=1e-5, atol=0)
    feats = det.features(test)
    torch.testing.assert_close(det.head_maps(feats, "coarse"), coarse, rtol=1e-6, atol=0)
    torch.testing.assert_close(det.head_maps(feats, "detail"), fine, rtol=1e-6, atol=0)
    # The score head is untouched by the detail head.
    no_detail = FREDetector(DetectorConfig(LITE, input_size=SIZE, detail_layers=None)).fit(train)
    torch.testing.assert_close(scores, no_detail.score(test), rtol=1e-6, atol=0)


def test_detail_head_settings() -> None:
    # Only where measured (Lite0), only on one plain pass; asking for it where it cannot combine is an error.
    assert DetectorConfig("efficientnet_lite1").detail_layers is None
    assert DetectorConfig(LITE, map_input_size=448).detail_layers is None
    assert DetectorConfig(LITE, input_size=96, tile_size=64, tile_stride=32).detail_layers is None
    assert DetectorConfig(LITE, map_layers=None).detail_layers is None
    assert DetectorConfig.reference(LITE).detail_layers is None
    with pytest.raises(ValueError, match="map_input_size or tile_size"):
        DetectorConfig(LITE, map_input_size=448, detail_layers=("blocks.4",))
    with pytest.raises(ValueError, match="needs a map head"):
        DetectorConfig(LITE, map_layers=None, detail_layers=("blocks.4",))
    with pytest.raises(ValueError, match="no layer"):
        DetectorConfig(LITE, detail_layers=("blocks.99",))
    # detail_pool 0 (default): the first detail layer pooled to stride 8, whatever its own stride
    assert DetectorConfig("efficientnet_lite1", detail_layers=("blocks.4", "blocks.6")).detail_head.grid == (30, 30)
    assert DetectorConfig(LITE, detail_layers=("blocks.3", "blocks.4")).detail_pool == 1
    assert DetectorConfig(LITE, detail_layers=("blocks.1", "blocks.4")).detail_pool == 2  # blocks.1: stride 4
    assert DetectorConfig(LITE, detail_pool=4).detail_head.grid == (14, 14)
    with pytest.raises(ValueError, match="detail_pool must be an int >= 0"):
        DetectorConfig(LITE, detail_pool=-1)


def test_detail_kept_only_for_images_larger_than_the_input() -> None:
    """``with_detail_for``: the median short side of the training images against 1.5x the map head's input."""
    cfg = DetectorConfig(LITE)  # 224 px: the detail head needs a median short side >= 336 px
    assert with_detail_for(cfg, [(384, 384)] * 5) is cfg
    assert with_detail_for(cfg, [(336, 900)] * 3 + [(100, 100)] * 2) is cfg  # median short side 336
    small = with_detail_for(cfg, [(335, 900)] * 3 + [(1000, 1000)] * 2)  # median short side 335
    assert small.detail_layers is None and small.map_grid == (14, 14) and small.layers == cfg.layers
    assert with_detail_for(cfg, []) is cfg  # nothing to judge by: the configuration as given
    off = DetectorConfig(LITE, detail_layers=None)
    assert with_detail_for(off, [(1000, 1000)]) is off


def test_model_files_before_the_detail_head_load_without_one(data, tmp_path: Path) -> None:
    """A version-2 file (written before ``detail_layers`` existed) loads as a two-head detector, maps unchanged."""
    train, test = data
    det = FREDetector(DetectorConfig(LITE, input_size=SIZE, detail_layers=None)).fit(train)
    payload = torch.load(det.save(tmp_path / "m.pt"), weights_only=True)
    payload["version"] = 2
    del payload["config"]["detail_layers"], payload["config"]["detail_pool"]
    torch.save(payload, tmp_path / "v2.pt")
    old = FREDetector.load(tmp_path / "v2.pt")
    assert old.config.detail_layers is None and old.config.map_grid == (4, 4)
    for a, b in zip(old.anomaly_maps(test), det.anomaly_maps(test)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.full
def test_tiles_are_the_subspace_samples(data) -> None:
    """A 96 px image in 4 tiles of 64 px at stride 32: the shared subspaces are those of a detector fitted on the
    tiles as images; the image score is the sum of its tiles' scores; the map is their maps placed and averaged."""
    train, test = _images(10, 96, 96, 2), _images(3, 96, 96, 3)
    cfg = DetectorConfig(LITE, input_size=96, tile_size=SIZE, tile_stride=32, image_score="fre")
    assert cfg.score_head.tiles == ((0, 0), (0, 32), (32, 0), (32, 32)) and cfg.map_grid == (6, 6)
    tiled = FREDetector(cfg).fit(train)

    def crops(x: torch.Tensor) -> torch.Tensor:  # (B, 3, 96, 96) -> (B * 4, 3, 64, 64), tiles row-major per image
        return torch.stack([x[:, :, t:t + SIZE, l:l + SIZE] for t, l in cfg.score_head.tiles], 1).flatten(0, 1)

    plain = FREDetector(DetectorConfig(LITE, input_size=SIZE, image_score="fre", detail_layers=None)).fit(crops(train))
    assert [int(s.n_samples) for s in tiled.subspaces] == [40, 40]  # 10 images x 4 tiles
    for a, b in zip([*tiled.subspaces, *tiled.map_subspaces], [*plain.subspaces, *plain.map_subspaces]):
        torch.testing.assert_close(a.components.abs(), b.components.abs(), rtol=1e-4, atol=1e-5)
    scores, maps = tiled.anomaly_maps(test)
    tile_scores, tile_maps = plain.anomaly_maps(crops(test))
    torch.testing.assert_close(scores, tile_scores.view(3, 4).sum(1), rtol=1e-4, atol=0)
    # tile (r, c) covers cells [2r, 2r + 4) x [2c, 2c + 4) of the 6 x 6 image grid (cells of 16 px)
    expected, count = torch.zeros(3, 6, 6), torch.zeros(6, 6)
    for t, (top, left) in enumerate(cfg.score_head.tiles):
        expected[:, top // 16:top // 16 + 4, left // 16:left // 16 + 4] += tile_maps.view(3, 4, 4, 4)[:, t]
        count[top // 16:top // 16 + 4, left // 16:left // 16 + 4] += 1
    torch.testing.assert_close(maps, expected / count, rtol=1e-4, atol=1e-6)


@pytest.mark.full
def test_top_score_standardises_each_cell_by_its_out_of_fold_statistics(data) -> None:
    """image_score='top': a cell's mean and deviation come from maps of training images that their fold's model did
    not see (5 seeded folds); the score is the mean of the top 10 % standardised cells. Rebuilt here from
    single-head detectors fitted on the folds."""
    from fre_torch.detection.detector import CELL_FOLDS

    train, test = data
    det = FREDetector(DetectorConfig(LITE, input_size=SIZE)).fit(train)
    assert det.config.image_score == "top" and det.cell_mean.shape == (4,)  # the 2 x 2 score grid at 64 px
    n = len(train)
    fold_of = torch.empty(n, dtype=torch.int64)
    fold_of[torch.randperm(n, generator=torch.Generator().manual_seed(0))] = torch.arange(n) % CELL_FOLDS
    oof = torch.empty(n, 4)
    for f in range(CELL_FOLDS):
        held = fold_of == f
        fold = FREDetector(DetectorConfig(LITE, input_size=SIZE, map_layers=None, image_score="fre"))
        oof[held] = fold.fit(train[~held]).anomaly_maps(train[held])[1].flatten(1)
    torch.testing.assert_close(det.cell_mean, oof.mean(0), rtol=1e-4, atol=0)
    torch.testing.assert_close(det.cell_std, oof.std(0), rtol=1e-4, atol=0)
    cells = FREDetector(DetectorConfig(LITE, input_size=SIZE, map_layers=None, image_score="fre")).fit(train)
    z = (cells.anomaly_maps(test)[1].flatten(1) - oof.mean(0)) / oof.std(0)
    torch.testing.assert_close(det.score(test), z.max(dim=1).values, rtol=1e-4, atol=1e-5)  # 10 % of 4 cells: 1
    # 'fre' is the plain sum over cells and layers: the normalised FRE
    fre = FREDetector(DetectorConfig(LITE, input_size=SIZE, image_score="fre")).fit(train)
    torch.testing.assert_close(fre.score(test), cells.score(test), rtol=1e-6, atol=0)


@pytest.mark.full
def test_a_second_map_pass_equals_a_detector_on_the_larger_images(data) -> None:
    """map_input_size: the map head runs on the images at 128 px -- exactly a single-head detector given them -- and
    the score head at 64 px, resized from them on the device (bilinear, antialiased, after normalising)."""
    import torch.nn.functional as F

    train, test = _images(16, 128, 128, 4), _images(4, 128, 128, 5)
    cfg = DetectorConfig(LITE, input_size=SIZE, map_input_size=128, map_pool=4)
    assert cfg.load_size == 128 and cfg.map_grid == (4, 4)
    two = FREDetector(cfg).fit(train)
    assert len(two._passes) == 2
    map_only = FREDetector(DetectorConfig(LITE, input_size=128, layers=cfg.map_layers, pool=4,
                                          map_layers=None)).fit(train)
    torch.testing.assert_close(two.anomaly_maps(test)[1], map_only.anomaly_maps(test)[1], rtol=1e-6, atol=0)

    # The score head's rows are a 64 px detector's rows of those normalised, bilinear-resized images (its compiled
    # step fed them directly: a uint8 input would round them), so the fits and scores are that detector's.
    score_only = FREDetector(DetectorConfig(LITE, input_size=SIZE, map_layers=None))
    small = F.interpolate(two.normalize(test), size=(SIZE, SIZE), mode="bilinear", antialias=True)
    want = score_only._extract_embed(small.contiguous(memory_format=torch.channels_last), 0)[0]
    got = two.features(test)[:cfg.n_score_subspaces]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-5, atol=1e-6)
    # Raw tensors at another size than the load size are resized as the reader resizes files (LANCZOS, to its
    # pixels), not bilinear: a 64 px detector given the 128 px images sees other rows.
    assert not torch.allclose(score_only.features(test)[0], got[0], rtol=1e-3, atol=1e-3)


def test_non_square_input_keeps_its_shape(tmp_path: Path) -> None:
    cfg = DetectorConfig(LITE, input_size=(64, 160), detail_layers=DEFAULT_DETAIL_LAYERS[LITE])
    assert cfg.input_size == (64, 160) and cfg.score_head.grid == (2, 5) and cfg.map_head.grid == (4, 10)
    assert cfg.map_grid == (8, 20)  # the detail head's
    det = FREDetector(cfg).fit(_images(12, 64, 160, 6))
    scores, maps = det.anomaly_maps(_images(2, 64, 160, 7))
    assert scores.shape == (2,) and maps.shape == (2, 8, 20)
    # the reader resizes files to (height, width), LANCZOS
    from PIL import Image

    Image.new("RGB", (300, 50), (10, 20, 30)).save(tmp_path / "strip.png")
    item = ImageDataset([tmp_path / "strip.png"], (64, 160))[0]
    assert item["image"].shape == (3, 64, 160) and item["orig_size"].tolist() == [50, 300]
    path = det.save(tmp_path / "strip.pt")
    again = FREDetector.load(path)
    assert again.config == cfg
    torch.testing.assert_close(again.anomaly_maps(_images(2, 64, 160, 7))[1], maps, rtol=0, atol=0)


@pytest.mark.full
def test_two_head_model_file_round_trip(data, tmp_path: Path) -> None:
    train, test = data
    cfg = DetectorConfig(LITE, input_size=SIZE, detail_layers=DEFAULT_DETAIL_LAYERS[LITE])
    det = FREDetector(cfg).fit(train[:18]).calibrate(train[18:], quantile=0.9)
    loaded = FREDetector.load(det.save(tmp_path / "m.pt"))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["version"] == 4  # map head, then detail head; 4: the summaries
    assert len(payload["map_subspaces"]) == len(DEFAULT_MAP_LAYERS[LITE]) + len(DEFAULT_DETAIL_LAYERS[LITE]) == 6
    for a, b in zip(det.anomaly_maps(test), loaded.anomaly_maps(test)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(loaded.map_scale) == float(det.map_scale)


@pytest.mark.parametrize("backbone", list_backbones())
def test_default_map_layers_locate_on_a_finer_grid(backbone: str) -> None:
    """Every registered backbone has map layers: one stage finer than its score layers' first, on a finer grid."""
    spec = get_backbone_spec(backbone)
    cfg = DetectorConfig(backbone)
    assert cfg.map_layers == DEFAULT_MAP_LAYERS[backbone]
    assert spec.layers[cfg.map_layers[0]].stride < spec.layers[cfg.layers[0]].stride
    assert cfg.map_grid[0] > cfg.score_head.grid[0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"map_layers": ("blocks.99",)}, "no layer"),
    ({"map_layers": ("blocks.4", "blocks.4")}, "distinct"),
    ({"map_pool": 0}, "map_pool"),
    ({"map_input_size": 448, "map_layers": None}, "needs a map head"),
    ({"kernel": "rbf", "map_layers": ("blocks.4",)}, "linear mode"),
    ({"input_size": (64, 10)}, ">= 32"),
    ({"input_size": (64, 64, 3)}, "height, width"),
    ({"tile_size": 300}, "larger than the image side"),
    ({"tile_size": 160, "tile_stride": 30}, "whole steps"),
    ({"tile_size": 160, "tile_stride": 8, "input_size": 224}, "multiples of a grid cell"),
    ({"tile_size": 112, "map_input_size": 448}, "do not combine"),
    ({"tile_stride": 32}, "needs tile_size"),
])
def test_bad_head_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DetectorConfig(LITE, **kwargs)


def test_command_line_values_build_the_heads() -> None:
    cfg = run.detector_config(LITE, input_size=[96, 160], map_layers=["blocks.3", "blocks.8"], map_pool=1,
                              map_input_size=[0], tile_size=[0], tile_stride=[0])
    assert cfg.input_size == (96, 160) and cfg.map_layers == ("blocks.3", "blocks.8") and cfg.map_pool == 1
    assert run.detector_config(LITE, map_layers=["none"]).map_layers is None
    tiled = run.detector_config(LITE, input_size=[448], tile_size=[224], tile_stride=[112])
    assert tiled.score_head.n_tiles == 9 and tiled.map_grid == (28, 28)
    with pytest.raises(ValueError, match="one side"):
        run.detector_config(LITE, input_size=[1, 2, 3])
    assert DetectorConfig.reference(LITE).map_layers is None  # the reference: one layer, its map sums to the score


def test_fit_keeps_the_default_detail_head_only_for_images_that_carry_detail() -> None:
    """``DetectorConfig()``'s detail head is an automatic choice made at fit from the training images' stored size
    (``DetectorConfig.for_images``): dropped for images no larger than the input, kept for images twice as large;
    a head asked for by name is kept, and the choice survives ``dataclasses.replace``."""
    import dataclasses

    cfg = DetectorConfig(LITE, input_size=SIZE)
    assert cfg.detail_auto and dataclasses.replace(cfg, top_fraction=0.2).detail_auto
    assert cfg.to_dict()["detail_layers"] == list(DEFAULT_DETAIL_LAYERS[LITE])  # JSON and files as before
    small = FREDetector(cfg).fit(_images(8, SIZE, SIZE, 1))
    assert small.config.detail_layers is None and list(small.heads) == ["score", "map"]
    large = FREDetector(cfg).fit(_images(8, 2 * SIZE, 2 * SIZE, 1))
    assert "detail" in large.heads and large.config.map_grid == (8, 8)
    asked = FREDetector(DetectorConfig(LITE, input_size=SIZE, detail_layers=DEFAULT_DETAIL_LAYERS[LITE]))
    assert "detail" in asked.fit(_images(8, SIZE, SIZE, 1)).heads
    assert cfg.for_images([(SIZE, SIZE)] * 3).detail_layers is None
    assert cfg.for_images([(3 * SIZE, 2 * SIZE)] * 3) is cfg
