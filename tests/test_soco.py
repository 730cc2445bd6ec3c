"""SoCo method: loss, level assignment, per-level RoIAlign, EMA schedule, variants.
Models use random weights (tiny ResNet-18, width 8) on synthetic batches that follow
the `soco` batch contract in docs/interfaces.md."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from train.methods import cosine_momentum, ema_update, get, make_target
from train.methods.soco import assign_levels, byol_box_loss, pool_boxes

torch.set_num_threads(1)
TINY = dict(backbone="resnet18", width=8, fpn_channels=16, head_conv_channels=16, head_fc_dim=32,
            proj_hidden=32, proj_dim=16)


def synthetic_batch(B=2, size=64, K=4, star=False, seed=0) -> dict:
    """A `soco` (or `soco_star`) batch per the contract: views, boxes in view pixels,
    ids shared across the views of one image, -1 padding."""
    g = torch.Generator().manual_seed(seed)

    def boxes(s):
        xy = torch.rand(B, K, 2, generator=g) * s * 0.6
        wh = torch.rand(B, K, 2, generator=g) * s * 0.4 + 2
        return torch.cat([xy, (xy + wh).clamp(max=s)], -1)

    def ids():
        i = torch.randint(0, 3, (B, K), generator=g)
        i[:, -1] = -1  # one padding slot per image
        return i

    small = size // 2 if not star else size * 192 // 224
    b = dict(view1=torch.randn(B, 3, size, size, generator=g), view2=torch.randn(B, 3, size, size, generator=g),
             view3=torch.randn(B, 3, small, small, generator=g))
    for key, s in (("1_2", size), ("2", size), ("1_3", size), ("3", small)):
        b[f"boxes{key}"], b[f"ids{key}"] = boxes(s), ids()
    b["ids2"], b["ids3"] = b["ids1_2"].clone(), b["ids1_3"].clone()
    if star:
        b["view4"] = torch.randn(B, 3, size // 2, size // 2, generator=g)
        b["boxes4"], b["ids4"] = b["boxes2"] / 2, b["ids2"].clone()
    return b


def test_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    ids_p = torch.tensor([[0, 1, 2, -1], [5, 5, 6, 7], [-1, -1, -1, -1]])
    ids_z = torch.tensor([[1, 0, 0, -1], [5, 7, 8, 9], [0, 1, 2, 3]])
    per_image = []
    for n in range(3):
        num, den = 0.0, 0.0
        for i in range(4):
            for j in range(4):
                if ids_p[n, i] >= 0 and ids_p[n, i] == ids_z[n, j]:
                    a, b = p[n, i].tolist(), z[n, j].tolist()
                    cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
                    num, den = num + cos, den + 1
        per_image.append(num / (den + 1e-6))
    expected = -2 * sum(per_image) / 3
    assert byol_box_loss(p, z, ids_p, ids_z).item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_minus_two_for_aligned_embeddings():
    p = torch.randn(1, 4, 8)
    ids = torch.tensor([[0, 1, 2, 3]])
    assert byol_box_loss(p, p * 3.0, ids, ids).item() == pytest.approx(-2.0, abs=1e-5)
    assert byol_box_loss(p, -p, ids, ids).item() == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("side,level", [(1, 0), (48, 0), (48.01, 1), (96, 1), (96.01, 2),
                                        (192, 2), (192.01, 3), (224, 3), (300, 3)])
def test_level_assignment_edges(side, level):
    ranges = torch.tensor([48.0, 96.0, 192.0, 224.0])
    box = torch.tensor([[10.0, 20.0, 10.0 + side, 20.0 + side]])
    assert assign_levels(box, ranges).item() == level


def test_level_uses_sqrt_of_area_not_side():
    ranges = torch.tensor([48.0, 96.0, 192.0, 224.0])
    # 24 x 96: sqrt(wh) = 48 -> P2 although one side is 96
    assert assign_levels(torch.tensor([[0.0, 0.0, 24.0, 96.0]]), ranges).item() == 0


def test_each_box_is_pooled_only_at_its_level():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 4, 32 // 2**i, 32 // 2**i, generator=g) for i in range(4)]
    boxes = torch.tensor([[[0, 0, 8, 8], [4, 4, 30, 30]], [[2, 2, 20, 12], [0, 0, 32, 32]]], dtype=torch.float32)
    levels = torch.tensor([[0, 2], [1, 3]])
    pooled = pool_boxes(feats, boxes, levels, view_size=128, output_size=7)
    for n in range(2):
        for k in range(2):
            lv = levels[n, k].item()
            want = roi_align(feats[lv][n:n + 1], [boxes[n, k:k + 1]], 7,
                             spatial_scale=feats[lv].shape[-1] / 128, sampling_ratio=-1, aligned=True)
            torch.testing.assert_close(pooled[n * 2 + k], want[0])
    # changing a level no box of image 1 uses changes nothing for image 1
    other = [f.clone() for f in feats]
    other[0][1] += 100.0  # image 1 has no P2 box
    torch.testing.assert_close(pool_boxes(other, boxes, levels, 128, 7)[2:], pooled[2:])


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_ema_update_averages_parameters_not_buffers():
    online = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online[1].running_mean.fill_(5.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(online, target, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
        assert not t.requires_grad
    assert target[1].running_mean.abs().max() == 0


@pytest.mark.parametrize("variant", ["fpn", "star", "c4"])
def test_variants_train_online_only(variant):
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(variant=variant, **TINY)})
    out = method(synthetic_batch(star=variant == "star"))
    pairs = {"fpn": {"loss_12", "loss_13"}, "star": {"loss_12", "loss_13", "loss_14"}, "c4": {"loss_12"}}[variant]
    assert set(out) == {"loss"} | pairs
    assert out["loss"].item() == pytest.approx(sum(out[k] for k in pairs), rel=1e-5)
    assert -2.0 * len(pairs) * 2 - 1e-4 <= out["loss"].item() <= 2.0 * len(pairs) * 2 + 1e-4
    out["loss"].backward()
    assert method.backbone.conv1.weight.grad is not None and method.predictor[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.target.parameters())
    # target update follows tau_k: target <- tau t + (1 - tau) online
    t0 = [p.clone() for p in method.target.parameters()]
    with torch.no_grad():
        method.backbone.conv1.weight.add_(1.0)
    method.momentum_update(3, 10)
    tau = cosine_momentum(3, 10, 0.99)
    torch.testing.assert_close(method.target[0].conv1.weight, tau * t0[0] + (1 - tau) * method.backbone.conv1.weight)


@pytest.mark.parametrize("roi_size", [None, 4])
def test_c4_box_embedding_is_res5_over_the_roi_aligned_res4_grid_of_the_configured_side(roi_size):
    """C4: a box's embedding is projector(avgpool(res5(RoIAlign(res4, box, s x s)))),
    s = model.roi_size (the paper's 14 when unset), computed here by hand."""
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(variant="c4", roi_size=roi_size, **TINY)}).eval()
    side = roi_size or 14
    assert method.roi_size == side
    b = synthetic_batch()
    x, boxes = b["view1"], b["boxes1_2"]
    with torch.no_grad():
        res4 = method.backbone.features(x, upto=4)[-1]
        got = method._embed(method._online, [res4], boxes, x.shape[-1], 1.0)
        for n in range(boxes.shape[0]):
            for k in range(boxes.shape[1]):
                roi = torch.cat([torch.tensor([[float(n)]]), boxes[n, k][None].float()], 1)
                grid = roi_align(res4, roi, side, spatial_scale=res4.shape[-1] / x.shape[-1],
                                 sampling_ratio=-1, aligned=True)
                assert grid.shape[-2:] == (side, side)
                want = method.projector(method.backbone.layer4(grid).mean((2, 3)))[0]
                torch.testing.assert_close(got[n, k], want, rtol=1e-4, atol=1e-5)


def test_image_without_valid_pair_keeps_loss_finite():
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(**TINY)})
    b = synthetic_batch()
    for key in ("ids1_2", "ids2"):
        b[key][0] = -1  # image 0 has no valid pair for (1,2): contributes 0, not NaN
    out = method(b)
    assert torch.isfinite(out["loss"])


def test_unknown_model_key_is_rejected():
    with pytest.raises(ValueError, match="unknown SoCo model keys"):
        get("soco").build({"model": dict(widht=8)})
    with pytest.raises(ValueError, match="unknown method"):
        get("nosuchmethod")


@pytest.mark.parametrize("variant,recipe,options", [("star", "soco_star", {}), ("c4", "soco_c4", {}),
                                                    ("c4", "soco", {"scale2": (0.6, 1.0)})])
def test_variants_consume_real_loader_batches(sample_shards, variant, recipe, options):
    """The loader's recipe and the method agree on the batch contract (keys, pixel boxes)."""
    from train.loader import build_loader
    loader = build_loader(recipe, sample_shards, 2, backend="reference", num_workers=0, image_size=64, **options)
    batch = next(iter(loader))
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(variant=variant, **TINY)})
    out = method(batch)
    assert torch.isfinite(out["loss"]) and len([k for k in out if k.startswith("loss_")]) == len(method.pairs)
    for pair in method.pairs:  # boxes lie inside their view (keys from the recipe's BoxSets)
        for box_set in pair[:2]:
            size = batch[box_set.view].shape[-1]
            assert batch[box_set.boxes].min() >= 0 and batch[box_set.boxes].max() <= size, box_set.boxes


def test_the_c4_recipe_draws_no_third_view_and_the_fpn_variant_says_which_recipe_it_needs(sample_shards):
    from train.loader import build_loader
    from train.loader.recipes import Recipe
    from train.methods import check_recipe, recipe_name
    from train.schema import ConfigError
    c4 = build_loader("soco_c4", sample_shards, 2, backend="reference", num_workers=0, image_size=64)
    batch = next(iter(c4))
    assert "view3" not in batch and "boxes3" not in batch and batch["view2"].shape[-1] == 64
    assert set(c4.recipe.batch_keys) <= set(batch)                 # the keys the check reads are the batch's
    assert Recipe("soco_c4").cfg["scale2"] == (0.6, 1.0)          # the C4 scripts' V2 crop
    with pytest.raises(ValueError, match="no parameters"):         # V3's knobs are not silently ignored
        Recipe("soco_c4", scale3=(0.2, 1.0))
    torch.manual_seed(0)
    module = get("soco")
    fpn = module.build({"model": dict(variant="fpn", **TINY)})
    with pytest.raises(ConfigError, match="data.recipe=soco_c4: its batches carry no boxes1_3, ids1_3, view3, boxes3, ids3, "
                                          "which method soco reads here; set data.recipe=soco "):
        check_recipe(fpn, "soco", "soco_c4", c4.recipe.batch_keys)
    c4_method = module.build({"model": dict(variant="c4", **TINY)})
    check_recipe(c4_method, "soco", "soco_c4", c4.recipe.batch_keys)          # C4 reads V1, V2 only
    assert recipe_name({"data": {"recipe": None}}, module, c4_method) == "soco_c4"   # its own when null
    assert recipe_name({"data": {"recipe": None}}, module, fpn) == "soco"
    assert recipe_name({"data": {"recipe": "soco_star"}}, module, c4_method) == "soco_star"   # data.recipe wins
    star = module.build({"model": dict(variant="star", **TINY)})
    soco = build_loader("soco", sample_shards, 2, backend="reference", num_workers=0, image_size=64)
    with pytest.raises(ConfigError, match="carry no view4, boxes4, ids4.*set data.recipe=soco_star"):
        check_recipe(star, "soco", "soco", soco.recipe.batch_keys)


def test_the_trainer_refuses_a_recipe_the_method_cannot_read_before_the_first_step(sample_shards, tmp_path):
    from train.config import load_config
    from train.pretrain import train
    from train.schema import ConfigError
    cfg = load_config("train/configs/soco_small_cpu.yaml", [
        f"data.shards={sample_shards}", "data.batch_size=2", "data.recipe=soco_c4", f"train.out={tmp_path / 'run'}",
        "train.steps=1", "eval.every=0", "train.tensorboard=false"])
    with pytest.raises(ConfigError, match="set data.recipe=soco "):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    # the c4 variant with data.recipe null reads its own recipe, soco_c4, whose options are checked
    c4 = ["model.variant=c4", "model.roi_size=2", "data.recipe=null"]
    bad = load_config("train/configs/soco_small_cpu.yaml", [
        f"data.shards={sample_shards}", "data.batch_size=2", f"train.out={tmp_path / 'bad'}", "train.steps=1",
        "eval.every=0", "train.tensorboard=false", "data.options.size3=16", *c4])   # soco takes size3
    with pytest.raises(ConfigError, match="data.recipe=soco_c4: unknown key 'data.options.size3'"):
        train(bad)
    good = load_config("train/configs/soco_small_cpu.yaml", [
        f"data.shards={sample_shards}", "data.batch_size=2", f"train.out={tmp_path / 'c4'}", "train.steps=1",
        "eval.every=0", "train.tensorboard=false", "export.enabled=false", *c4])
    train(good)
    records = (tmp_path / "c4" / "metrics.jsonl").read_text()
    assert '"loss_12"' in records and '"loss_13"' not in records     # one pair: V1 and V2 only


def test_valid_mask_excludes_boxes_like_padding_ids():
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(**TINY)})
    b = synthetic_batch()
    padded = {k: v.clone() for k, v in b.items()}
    padded["ids2"][:, 0] = -1
    masked = {k: v.clone() for k, v in b.items()}
    masked["valid2"] = torch.ones_like(b["ids2"], dtype=torch.bool)
    masked["valid2"][:, 0] = False
    method.eval()  # BN on running statistics: the two calls see identical features
    assert method(padded)["loss_12"] == pytest.approx(method(masked)["loss_12"], rel=1e-6)
    assert method(padded)["loss_12"] != pytest.approx(method(b)["loss_12"], rel=1e-6)
