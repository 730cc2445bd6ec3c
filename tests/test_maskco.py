"""MaskCo: the InfoNCE over region features (inter- and intra-image negatives, several
ranks) against a direct computation, RoIAlign pooling, the mask prediction head, one
method step (random-weight tiny ResNet-18), and the loader's box sampler (sizes, IoU
bound, the masked box on the same source pixels in both views, exactly that box zeroed)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from tests.test_detcon import run_ranks
from train.loader import build_loader, collate
from train.loader import geometry as G
from train.loader.recipes import NumpyDraw, Recipe
from train.methods import get
from train.methods.maskco import box_features, mask_prediction_head, maskco_loss

torch.set_num_threads(1)


def reference_loss(q, keys, offset, tau, intra):
    """Row by row: positive = own box 0; negatives = boxes 1.. of other images (+ own)."""
    total, hits = 0.0, 0
    for b in range(len(q)):
        own = offset + b
        logits = [float(q[b] @ keys[own, 0]) / tau]
        for c in range(len(keys)):
            if c == own and not intra:
                continue
            logits += [float(q[b] @ keys[c, j]) / tau for j in range(1, keys.shape[1])]
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(x - top) for x in logits)))
        hits += logits[0] == top
    return total / len(q), hits / len(q), len(logits)


@pytest.mark.parametrize("intra", [False, True])
@pytest.mark.parametrize("ranks", [1, 3])
def test_maskco_loss_matches_direct_computation(intra, ranks):
    g = torch.Generator().manual_seed(ranks + 10 * intra)
    B = 3
    keys = F.normalize(torch.randn(B * ranks, 17, 8, generator=g, dtype=torch.float64), dim=-1)
    q = F.normalize(torch.randn(B, 8, generator=g, dtype=torch.float64), dim=-1)
    q[0] = keys[0, 0]          # one query that finds its positive (accuracy is not trivially 0)
    for rank in range(ranks):
        loss, acc = maskco_loss(q, keys, offset=rank * B, temperature=0.2, intra=intra)
        want, want_acc, n_logits = reference_loss(q, keys, rank * B, 0.2, intra)
        assert loss.item() == pytest.approx(want, rel=1e-10)
        assert acc.item() == pytest.approx(want_acc)
        # negatives: 16 per other image (16 x 31 = 496 at 32 a GPU), +16 own with (+in)
        assert n_logits == 1 + 16 * (B * ranks - 1) + (16 if intra else 0)


def test_maskco_loss_in_half_precision_runs_in_float32():
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    keys = F.normalize(torch.randn(2, 17, 8, generator=g), dim=-1)
    full, _ = maskco_loss(q, keys)
    half, _ = maskco_loss(q.bfloat16(), keys.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)


def test_maskco_loss_rejects_misplaced_offset():
    with pytest.raises(ValueError, match="offset"):
        maskco_loss(torch.randn(2, 4), torch.randn(2, 17, 4), offset=1)


def test_box_features_average_the_box_region():
    """On a feature map linear in x and y, RoIAlign's mean over a box equals the map's
    value at the box centre (aligned: feature cell i is centred on image pixel (i+0.5)*stride)."""
    H = W = 16                         # a stride-4 map of a 64-px view
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    fmap = torch.stack([xs, ys, 2 * xs - ys])[None].repeat(2, 1, 1, 1)
    boxes = torch.tensor([[[8.0, 12.0, 40.0, 30.0], [20.5, 6.0, 52.0, 50.0]],
                          [[4.0, 4.0, 60.0, 60.0], [30.0, 30.0, 34.0, 34.0]]], dtype=torch.float64)
    got = box_features(fmap, boxes, image_size=64, roi_size=7)
    cx = (boxes[..., 0] + boxes[..., 2]) / 2 / 4 - 0.5
    cy = (boxes[..., 1] + boxes[..., 3]) / 2 / 4 - 0.5
    assert torch.allclose(got, torch.stack([cx, cy, 2 * cx - cy], dim=-1), atol=1e-9)


def test_mask_prediction_head_is_conv5_shaped_bottlenecks():
    head = mask_prediction_head(64, 3)
    assert len(head) == 3 and all(isinstance(b, Bottleneck) for b in head)
    assert head[0].conv1.out_channels == 16 and head[0].conv3.out_channels == 64   # 1x1 -> 3x3 -> 1x1, width C/4
    x = torch.randn(2, 64, 3, 3)
    assert head(x).shape == x.shape
    assert torch.equal(mask_prediction_head(64, 0)(x), x)                         # ablation: no MPH
    with pytest.raises(ValueError, match="mph_blocks"):
        mask_prediction_head(64, 9)


def _batch(B=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, 17, 2, generator=g) * (size - 24)
    boxes = torch.cat([xy, xy + 16 + 8 * torch.rand(B, 17, 2, generator=g)], dim=-1)
    return {"query": torch.randn(B, 3, size, size, generator=g), "key": torch.randn(B, 3, size, size, generator=g),
            "query_box": boxes[:, 0] * 0.9, "key_boxes": boxes}


@pytest.mark.parametrize("intra,blocks", [(False, 3), (True, 0)])
def test_maskco_step_query_path_has_mph_key_path_not(intra, blocks):
    torch.manual_seed(0)
    model = get("maskco").build({"model": {"backbone": "resnet18", "width": 8, "intra": intra,
                                           "mph_blocks": blocks, "dim": 16}})     # random weights
    batch = _batch()
    out = model(batch)
    with torch.no_grad():
        fq = model.mph(model.backbone.features(batch["query"])[-1])
        q = F.normalize(model.head(box_features(fq, batch["query_box"][:, None], 64, 7)[:, 0]), dim=1)
        k = F.normalize(model.key_head(box_features(model.key_backbone.features(batch["key"])[-1],
                                                    batch["key_boxes"], 64, 7)), dim=-1)
    want, _ = maskco_loss(q, k, intra=intra)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    out["loss"].backward()
    assert not any("mph" in name for name, _ in model.named_parameters() if name.startswith("key_"))
    assert all(p.grad is None for p in model.key_backbone.parameters())
    if blocks:
        assert model.mph[0].conv1.weight.grad.abs().sum() > 0
    assert model.optimizer == "sgd"


def _tiny_maskco(gather: bool):
    torch.manual_seed(0)                                  # the same random weights on every rank
    model = get("maskco").build({"model": {"backbone": "resnet18", "width": 8, "dim": 16, "gather": gather}})
    return model.eval()                                   # BN from running stats: per-image, batch-independent


def _maskco_rank(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch = _batch(B=2 * world)
        mine = {k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()}
        with torch.no_grad():
            loss = _tiny_maskco(gather=True)(mine)["loss"].item()
        torch.save({"loss": loss}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_take_negatives_from_every_rank_with_gather(tmp_path):
    """model.gather=true: each rank's queries meet the key boxes of all ranks' images."""
    world = 2
    run_ranks(_maskco_rank, world, str(tmp_path / "init"), str(tmp_path))
    model, batch = _tiny_maskco(gather=False), _batch(B=2 * world)
    with torch.no_grad():                                 # all images in one process, then split by rank
        fq = model.mph(model.backbone.features(batch["query"])[-1])
        q = F.normalize(model.head(box_features(fq, batch["query_box"][:, None], 64, 7)[:, 0]), dim=1)
        k = F.normalize(model.key_head(box_features(model.key_backbone.features(batch["key"])[-1],
                                                    batch["key_boxes"], 64, 7)), dim=-1)
    for rank in range(world):
        want, _ = maskco_loss(q[2 * rank: 2 * rank + 2], k, offset=2 * rank)
        local, _ = maskco_loss(q[2 * rank: 2 * rank + 2], k[2 * rank: 2 * rank + 2])
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["loss"]
        assert got == pytest.approx(want.item(), rel=1e-5)
        assert got != pytest.approx(local.item(), rel=1e-3)   # not just this rank's negatives


# --- the loader's MaskCo box sampler (train/loader, issue 5) -----------------------------
@pytest.fixture(scope="module")
def maskco_plans():
    """Many MaskCo plans over varied image sizes, from the loader's own recipe."""
    recipe = Recipe("maskco")
    rng = np.random.default_rng(0)
    plans = []
    for n in range(150):
        W, H = int(rng.integers(200, 900)), int(rng.integers(200, 900))
        plans.append(recipe.plan(W, H, np.array([[0, 0, W, H]], np.float32), NumpyDraw(rng), rng))
    return recipe, G, plans


def test_maskco_key_boxes_sizes_and_iou_bound(maskco_plans):
    recipe, G, plans = maskco_plans
    size = recipe.cfg["size"]
    sides = []
    for plan in plans:
        view, src = plan.boxes["key_boxes"]
        boxes = G.to_view(src, plan.views[view])
        assert boxes.shape == (17, 4)
        assert (boxes >= -1e-3).all() and (boxes <= size + 1e-3).all()
        wh = boxes[:, 2:] - boxes[:, :2]
        assert (wh <= 128 + 1e-3).all()
        sides.append(wh)
        assert (G.iou(boxes[0], boxes[1:]) < 0.2).all()
    sides = np.concatenate(sides)
    assert (sides[:, 0] >= 32 - 1e-3).mean() > 0.97   # box 0 shrinks only when the views barely overlap


def test_masked_box_is_the_same_source_region_in_both_views(maskco_plans):
    recipe, G, plans = maskco_plans
    for plan in plans:
        qv, qsrc = plan.boxes["query_box"]
        kv, ksrc = plan.boxes["key_boxes"]
        q_view = G.to_view(qsrc, plan.views[qv])            # what the batch carries
        k_view = G.to_view(ksrc[:1], plan.views[kv])
        # map both back to source pixels with the views' own crop+flip (independent inverse)
        for box, v in ((q_view[0], plan.views[qv]), (k_view[0], plan.views[kv])):
            x1, x2 = (v.out_w - box[[2, 0]]) if v.flip else box[[0, 2]]
            back = np.array([v.x0 + x1 * v.w / v.out_w, v.y0 + box[1] * v.h / v.out_h,
                             v.x0 + x2 * v.w / v.out_w, v.y0 + box[3] * v.h / v.out_h])
            assert np.allclose(back, ksrc[0], atol=1e-2), (back, ksrc[0])


def test_zeroed_region_is_exactly_the_query_box():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 40, 48, generator=g)
    boxes = torch.tensor([[3.2, 5.5, 20.0, 17.4], [0.0, 0.0, 48.0, 40.0], [47.0, 39.6, 48.0, 40.0]])
    before = images.clone()
    collate.zero_box(images, boxes)
    for b in range(3):
        x1, y1, x2, y2 = boxes[b].tolist()
        for y in range(40):
            for x in range(48):
                inside = x1 <= x + 0.5 < x2 and y1 <= y + 0.5 < y2
                want = torch.zeros(3) if inside else before[b, :, y, x]
                assert torch.equal(images[b, :, y, x], want), (b, y, x)


def _inside(box, h, w):
    """Pixels whose centre lies in the half-open box (the loader's zeroing rule)."""
    xs, ys = torch.arange(w) + 0.5, torch.arange(h) + 0.5
    return ((ys[:, None] >= box[1]) & (ys[:, None] < box[3]) & (xs[None] >= box[0]) & (xs[None] < box[2]))


def _to_source(box, view):
    """View pixels -> source pixels with the batch's crop (x0, y0, w, h, flip) of a `size` view."""
    x0, y0, w, h, flip = view.tolist()
    x1, x2 = box[0].item(), box[2].item()
    if flip:
        x1, x2 = SIZE - x2, SIZE - x1
    return torch.tensor([x0 + x1 * w / SIZE, y0 + box[1] * h / SIZE, x0 + x2 * w / SIZE, y0 + box[3] * h / SIZE])


SIZE = 64


@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_real_batches_zero_exactly_the_masked_box_of_the_same_region(backend, sample_shards):
    loader = build_loader("maskco", str(sample_shards), 4, backend=backend, image_size=SIZE, seed=3)
    batch = next(iter(loader))
    scale = SIZE / 224
    for b in range(4):
        qbox, kboxes = batch["query_box"][b], batch["key_boxes"][b]
        zero = (batch["query"][b] == 0).all(dim=0)
        assert torch.equal(zero, _inside(qbox, SIZE, SIZE)), f"image {b}: zeroed pixels != query box"
        assert zero.any()
        assert not (batch["key"][b] == 0).all(dim=0).any()                  # the key view is left whole
        sides = kboxes[:, 2:] - kboxes[:, :2]
        assert (sides <= 128 * scale + 1e-3).all() and (sides[1:] >= 32 * scale - 1e-3).all()
        assert (G.iou(kboxes[0].numpy(), kboxes[1:].numpy()) < 0.2).all()
        # views are (query, key): the masked box and key box 0 frame the same source pixels
        q_src = _to_source(qbox, batch["views"][b, 0])
        k_src = _to_source(kboxes[0], batch["views"][b, 1])
        assert torch.allclose(q_src, k_src, atol=0.05), (q_src, k_src)
