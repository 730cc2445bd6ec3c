"""ResNet distance: geometry of the crops, the distance itself against a direct torchvision
computation, determinism, the missing-weights error, and `make stats` rewriting parts.
The ResNet-50 has random weights (no download here) and 64 px views to stay fast; the
statistic's code path is the same as with the real weights."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from torchvision.transforms import functional as TF

from preprocess import stats
from preprocess.datasets import list_images
from preprocess.decode import load_rgb
from schemas import table_params
from schemas.proposals import PROPOSALS

SMALL = stats.StatsConfig(seed=3, pairs=2, size=64, batch_views=16)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return stats.ResNetDistance(random_weights=True, device="cpu")


@pytest.fixture(scope="module")
def images(sample_raw):
    return [(r.key, load_rgb(r.path)) for r in list_images("sample", sample_raw)[:4]]


def direct_distances(net: torch.nn.Module, key: str, rgb: np.ndarray, cfg) -> np.ndarray:
    """The statistic written out with torchvision's own pieces: PIL resized_crop, to_tensor,
    normalize, full resnet50 with fc removed (its avgpool is the global mean)."""
    from PIL import Image
    img = Image.fromarray(rgb)
    out = []
    for pair in stats.crop_pairs(key, rgb.shape[1], rgb.shape[0], cfg):
        ys = []
        for x1, y1, x2, y2 in pair.tolist():
            view = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [cfg.size, cfg.size],
                                   interpolation=TF.InterpolationMode.BILINEAR)
            x = TF.normalize(TF.to_tensor(view), stats.IMAGENET_MEAN, stats.IMAGENET_STD)
            with torch.no_grad():
                ys.append(torch.nn.functional.normalize(net(x[None]), dim=1)[0])
        out.append(float(((ys[0] - ys[1]) ** 2).sum()))
    return np.array(out)


def test_crops_follow_random_resized_crop():
    cfg = stats.StatsConfig(seed=0, pairs=200)
    boxes = stats.crop_pairs("img", 320, 240, cfg).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 320).all() and (boxes[:, 3] <= 240).all()
    area = w * h / (320 * 240)
    assert area.min() >= 0.19 and area.max() <= 1.0
    assert (w / h).min() >= 0.74 and (w / h).max() <= 1.35
    # Same distribution as torchvision's own sampler (rejections bias it below 0.6).
    torch.manual_seed(0)
    img = torch.zeros(3, 240, 320)
    ref = np.array([torchvision.transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(400)])
    ref_area = ref[:, 2] * ref[:, 3] / (320 * 240)
    assert area.mean() == pytest.approx(ref_area.mean(), abs=0.04)
    assert np.median(area) == pytest.approx(np.median(ref_area), abs=0.06)
    # A strip no 3/4..4/3 crop of 20%+ area fits in: torchvision's centre-crop fallback.
    x1, y1, x2, y2 = stats.crop_pairs("strip", 1000, 10, cfg)[0, 0]
    assert (x2 - x1, y2 - y1) == (13, 10) and x1 == (1000 - 13) // 2


def test_identical_views_give_zero(model, images):
    key, rgb = images[0]
    boxes = stats.crop_pairs(key, rgb.shape[1], rgb.shape[0], SMALL)[:, 0]
    views = stats.render_views(rgb, boxes, SMALL.size)
    z = model.embed(np.concatenate([views, views]))
    d = stats.pair_distance(z[:len(views)], z[len(views):])
    assert np.abs(d).max() < 1e-6
    other = stats.pair_distance(z[:1], z[1:2])  # two different crops
    assert other[0] > 1e-5


def test_distance_range(model, images):
    d = np.concatenate([dist for _, dist in model.image_distances(images, SMALL)])
    assert d.shape == (len(images) * SMALL.pairs,)
    assert (d >= 0).all() and (d <= 4).all() and d.max() > 0
    u = np.eye(3, dtype=np.float32)
    assert stats.pair_distance(u, -u).tolist() == [4.0, 4.0, 4.0]
    assert stats.pair_distance(u, u[[1, 2, 0]]).tolist() == [2.0, 2.0, 2.0]


def test_agrees_with_direct_torchvision_computation(model, images):
    net = torchvision.models.resnet50(weights=None)
    net.load_state_dict(model.net.state_dict())
    net.fc = torch.nn.Identity()
    net.eval()
    ours = dict(model.image_distances(images[:3], SMALL))
    for key, rgb in images[:3]:
        expected = direct_distances(net, key, rgb, SMALL)
        np.testing.assert_allclose(ours[key], expected, rtol=2e-3, atol=1e-6)


def test_deterministic_under_seed(model, images):
    first = dict(model.image_distances(images, SMALL))
    again = dict(stats.ResNetDistance(random_weights=True).image_distances(images, SMALL))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other_seed = stats.StatsConfig(seed=4, pairs=2, size=64)
    key, rgb = images[0]
    assert not np.array_equal(stats.crop_pairs(key, 160, 160, SMALL),
                              stats.crop_pairs(key, 160, 160, other_seed))
    # Crops of an image do not depend on which other images are in the batch.
    alone = dict(model.image_distances(images[2:3], SMALL))
    np.testing.assert_allclose(alone[images[2][0]], first[images[2][0]], rtol=1e-5)


def test_missing_weights_error_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("WEIGHTS", raising=False)
    with pytest.raises(stats.MissingWeightsError) as err:
        stats.find_weights()
    text = str(err.value)
    assert stats.WEIGHTS_URL in text
    assert str(tmp_path / "hub" / "hub" / "checkpoints" / stats.WEIGHTS_NAME) in text
    assert "WEIGHTS=" in text
    monkeypatch.setenv("WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(stats.MissingWeightsError, match="nope.pth does not exist"):
        stats.ResNetDistance()
    garbage = tmp_path / stats.WEIGHTS_NAME
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(stats.MissingWeightsError, match="not a loadable"):
        stats.ResNetDistance(weights=garbage)
