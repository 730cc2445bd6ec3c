"""DetCo: the 12-term loss against a direct per-sample loop (stage weights, queue negatives,
the hic/cglc switches), the jigsaw geometry of the recipe (plans, then pixels on both
backends), queues in checkpoints, 2 gloo ranks equal to one process, and a real trainer run
that resumes to the same next losses and exports a backbone that loads back. Tiny random
ResNet-18s (width 8), tiny synthetic images."""
from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loader_checks import classify, expected_labels, interior, margin_for
from tests.test_detcon import run_ranks
from train import callbacks
from train.config import load_config
from train.loader import build_loader, geometry as G
from train.loader.recipes import NumpyDraw, Recipe
from train.loader.source import ShardSource, decode_png
from train.loader.synthetic import write_shards
from train.methods import get
from train.methods.detco import PATCH_BOXES, PATCHES, VIEWS, patch_view_names
from train.models.backbone import build_backbone
from train.pretrain import train

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


def _tiny(**model) -> torch.nn.Module:
    opts = dict(backbone="resnet18", width=8, dim=8, queue_size=6)
    opts.update(model)
    return get("detco").build({"model": opts})


def _batch(B=3, size=32, patch=12, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"query": torch.randn(B, 3, size, size, generator=g), "key": torch.randn(B, 3, size, size, generator=g),
            PATCHES["query"]: torch.randn(B, 9, 3, patch, patch, generator=g),
            PATCHES["key"]: torch.randn(B, 9, 3, patch, patch, generator=g)}


def _nce(q, k, negatives, tau) -> float:
    """-log softmax of the positive among [q.k, q.negatives] / tau, in float64 by hand."""
    logits = [float(q.double() @ k.double()) / tau] + [float(q.double() @ n.double()) / tau for n in negatives]
    top = max(logits)
    return -(logits[0] - top - math.log(sum(math.exp(x - top) for x in logits)))


# --------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("hic,cglc,combine", [(True, True, "sum"), (True, True, "mean"),
                                              (False, True, "sum"), (True, False, "sum")])
def test_the_loss_is_the_weighted_sum_of_every_stage_and_term_computed_sample_by_sample(hic, cglc, combine):
    torch.manual_seed(0)
    weights, tau = [0.3, 0.5, 0.2, 1.5], 0.3
    model = _tiny(stage_weights=weights, temperature=tau, hic=hic, cglc=cglc, combine=combine).eval()
    for kind in model.queues.values():               # queues of distinct random keys, with a wrapped pointer
        for q in kind.values():
            q.enqueue(F.normalize(torch.randn(4, 8), dim=1))
    old = {(kind, s): q.keys.clone() for kind, qs in model.queues.items() for s, q in qs.items()}
    batch = _batch()
    out = model(batch)

    stages = ["res2", "res3", "res4", "res5"] if hic else ["res5"]
    want, terms, newest = 0.0, 0, {}
    with torch.no_grad():
        def pooled(net, x, s):                       # one image at a time (BN in eval mode)
            return net.forward_features(x[None])[s].mean(dim=(2, 3))[0]
        for s in stages:
            w = weights[["res2", "res3", "res4", "res5"].index(s)]
            for b in range(3):
                qg = F.normalize(model.head["global"][s](pooled(model.backbone, batch["query"][b], s)[None])[0], dim=0)
                kg = F.normalize(model.key_head["global"][s](pooled(model.key_backbone, batch["key"][b], s)[None])[0],
                                 dim=0)
                newest.setdefault(s, []).append(kg)
                per = [_nce(qg, kg, old[("global", s)], tau)]
                if cglc:
                    ql = F.normalize(model.head["local"][s](torch.cat([pooled(model.backbone, p, s) for p in
                                                                       batch[PATCHES["query"]][b]])[None])[0], dim=0)
                    kl = F.normalize(model.key_head["local"][s](torch.cat([pooled(model.key_backbone, p, s) for p in
                                                                           batch[PATCHES["key"]][b]])[None])[0], dim=0)
                    per += [_nce(ql, kl, old[("local", s)], tau), _nce(ql, kg, old[("global", s)], tau)]
                want += w * sum(per) / (len(per) if combine == "mean" else 1) / 3
            terms += len(per)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    assert len([k for k in out if k[:3] in ("gg_", "ll_", "lg_")]) == terms == len(stages) * (3 if cglc else 1)
    # this step's keys entered every queue, newest last
    for (kind, s), before in old.items():
        assert torch.equal(model.queues[kind][s].oldest_first()[:-3], torch.roll(before, -4, 0)[3:])
    for s, keys in newest.items():
        torch.testing.assert_close(model.queues["global"][s].oldest_first()[-3:], torch.stack(keys), rtol=1e-4, atol=1e-5)


def test_the_switches_drop_heads_and_queues_and_bad_options_are_refused():
    full, no_hic, no_cglc = _tiny(), _tiny(hic=False), _tiny(cglc=False)
    assert sorted(full.queues["local"]) == ["res2", "res3", "res4", "res5"] and len(full.queues["global"]) == 4
    assert list(no_hic.head["global"]) == ["res5"] and list(no_hic.queues["local"]) == ["res5"]
    assert "local" not in no_cglc.head and "local" not in no_cglc.queues
    out = no_cglc({"query": torch.randn(2, 3, 32, 32), "key": torch.randn(2, 3, 32, 32)})    # no patches needed
    assert torch.isfinite(out["loss"])
    with pytest.raises(KeyError, match="data.options.grid=3"):
        full({"query": torch.randn(2, 3, 32, 32), "key": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="stage_weights has 3 weights"):
        _tiny(stage_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown detco model keys"):
        get("detco").build({"model": {"hierarchical": False}})
    wide = _tiny(local_hidden="9c")
    assert wide.head["local"]["res5"][0].weight.shape == (9 * 64, 9 * 64)        # res5 of width 8: C = 64
    assert full.head["local"]["res5"][0].weight.shape == (64, 9 * 64)


def test_keys_carry_no_gradient_and_the_key_encoder_follows_by_constant_momentum():
    model = _tiny()
    model(_batch())["loss"].backward()
    assert all(p.grad is None for p in model.key_backbone.parameters())
    assert all(p.grad is None for p in model.key_head.parameters())
    assert model.head["local"]["res2"][0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    before, online = model.key_backbone.conv1.weight.clone(), model.backbone.conv1.weight.clone()
    model.momentum_update(step=3, total_steps=10)
    assert torch.allclose(model.key_backbone.conv1.weight, 0.999 * before + 0.001 * online)


def test_queues_are_in_the_state_dict_and_a_restored_model_gives_the_same_next_loss():
    torch.manual_seed(0)
    a = _tiny().eval()
    a(_batch(seed=1))
    state = a.state_dict()
    queue_keys = [k for k in state if k.startswith("queues.")]
    assert len(queue_keys) == 16                                        # 8 queues x (keys, ptr)
    assert int(state["queues.local.res3.ptr"]) == 3
    torch.manual_seed(5)
    b = _tiny().eval()
    b.load_state_dict(state)
    assert a(_batch(seed=2))["loss"].item() == b(_batch(seed=2))["loss"].item()


# --------------------------------------------------------------------------- the recipe
def test_each_patch_is_an_integer_source_rectangle_inside_its_own_jigsaw_cell():
    recipe = Recipe("detco", image_size=96)
    P, S = recipe.cfg["patch"], 96
    assert P == round(64 * 96 / 224)                                     # the patch scales with the view
    rng = np.random.default_rng(0)
    for W, H in [(160, 120), (120, 160), (500, 90), (64, 64)] * 10:
        plan = recipe.plan(W, H, np.zeros((0, 4), np.float32), NumpyDraw(rng), rng)
        for v in VIEWS:
            view = plan.views[v]
            cells = plan.ids[PATCH_BOXES[v].ids]
            assert sorted(cells.tolist()) == list(range(9))              # one patch per cell, shuffled
            box_view, src = plan.boxes[PATCH_BOXES[v].boxes]
            assert box_view == v and np.all(src == np.round(src))
            for slot, (name, cell) in enumerate(zip(patch_view_names(v, 9), cells)):
                pv = plan.views[name]
                assert (pv.out_w, pv.out_h, pv.flip) == (P, P, view.flip)
                assert np.array_equal(pv.rect, src[slot])
                # in the view's pixels (mapped forward, the inverse of how it was drawn):
                # inside row cell // 3, column cell % 3, about P pixels a side
                x1, y1, x2, y2 = G.to_view(pv.rect, view)[0]
                r, c = divmod(int(cell), 3)
                assert c * S / 3 - 1e-2 <= x1 < x2 <= (c + 1) * S / 3 + 1e-2, (W, H, view, cell)
                assert r * S / 3 - 1e-2 <= y1 < y2 <= (r + 1) * S / 3 + 1e-2, (W, H, view, cell)
                px = S / view.w, S / view.h                               # view pixels per source pixel
                assert abs((x2 - x1) - P) <= px[0] / 2 + 1e-3 and abs((y2 - y1) - P) <= px[1] / 2 + 1e-3


@pytest.mark.parametrize("patches", ["image", "view"])
def test_both_backends_map_one_plans_patch_boxes_to_the_same_view_pixels(patches):
    """The DALI feeder moves boxes with geometry.to_view, the reference with torchvision's
    tv_tensors: on the same plans (flips included) the patch boxes agree."""
    from torchvision import tv_tensors
    from train.loader.reference import geometric
    recipe = Recipe("detco", image_size=96, patches=patches)
    rng = np.random.default_rng(1)
    flips = set()
    for W, H in [(160, 120), (120, 160), (300, 90)] * 6:
        plan = recipe.plan(W, H, np.zeros((0, 4), np.float32), NumpyDraw(rng), rng)
        for key, (v, src) in plan.boxes.items():
            flips.add(plan.views[v].flip)
            bb = tv_tensors.BoundingBoxes(torch.from_numpy(src), format="XYXY", canvas_size=(H, W))
            ref = geometric(bb, plan.views[v]).as_subclass(torch.Tensor).numpy()
            np.testing.assert_allclose(ref, G.to_view(src, plan.views[v]), atol=1e-3)
    assert flips == {True, False}


def test_recipe_options_are_checked_and_grid_0_cuts_no_patches():
    with pytest.raises(ValueError, match="data.options.patch"):
        Recipe("detco", patch=80)
    with pytest.raises(ValueError, match="data.options.grid"):
        Recipe("detco", grid=-1)
    plain = Recipe("detco", grid=0)
    assert [s.name for s in plain.views] == list(VIEWS) and plain.box_sets == ()
    rng = np.random.default_rng(0)
    assert sorted(plain.plan(100, 80, np.zeros((0, 4)), NumpyDraw(rng), rng).views) == sorted(VIEWS)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    shards = write_shards(tmp_path_factory.mktemp("syn") / "shards", 8, per_shard=4, seed=3)
    src = ShardSource(shards)
    return shards, [decode_png(src.data.read_members(src.data.row(i), ["fh.png"])["fh.png"], k)
                    for i, k in enumerate(src.keys)]


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_patch_pixels_are_their_source_rectangle_and_the_crop_of_their_view(backend, syn):
    """Colour off: each patch shows its recorded source rectangle (the independent label
    oracle), and the same pixels as its view sampled at the patch's box (its place in the view)."""
    shards, labels = syn
    size = 96
    recipe = Recipe("detco", image_size=size)
    names = [s.name for s in recipe.views]
    P = recipe.cfg["patch"]
    loader = build_loader("detco", shards, 4, backend=backend, num_workers=0, image_size=size, colour=False)
    checked = 0
    for batch in loader:
        assert batch[PATCHES["query"]].shape == (4, 9, 3, P, P)
        for b in range(4):
            src = labels[int(batch["index"][b])]
            for v in VIEWS:
                view_classes = classify(batch[v][b])
                for slot, name in enumerate(patch_view_names(v, 9)):
                    params = batch["views"][b, names.index(name)]
                    patch = batch[PATCHES[v]][b, slot]
                    classes = classify(patch)
                    want = expected_labels(src, params, P)
                    keep = interior(want, margin_for(params, P))
                    assert (classes[keep] == want[keep]).mean() > 0.98, (backend, b, v, slot)
                    # the patch's box in view pixels, sampled at the patch's pixel centres
                    x1, y1, x2, y2 = batch[PATCH_BOXES[v].boxes][b, slot].tolist()
                    i = np.arange(P) + 0.5
                    xs = np.floor(x1 + i * (x2 - x1) / P).astype(int).clip(0, size - 1)
                    ys = np.floor(y1 + i * (y2 - y1) / P).astype(int).clip(0, size - 1)
                    in_view = view_classes[ys[:, None], xs[None, :]]
                    keep &= interior(in_view, 1)
                    assert (classes[keep] == in_view[keep]).mean() > 0.98, (backend, b, v, slot)
                    pix = patch.permute(1, 2, 0).numpy()[keep]
                    ref = batch[v][b].permute(1, 2, 0).numpy()[ys[:, None], xs[None, :]][keep]
                    assert np.abs(pix - ref).mean() < 0.05                 # normalised units: ~3/255
                    checked += int(keep.sum())
    assert checked > 10000


@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_patches_cut_from_the_view_share_its_colour_and_lie_in_their_cells(backend, syn):
    """`patches: view` (the shuuchen reading): colour on, each patch is exactly the pixels of
    its recorded box in the augmented view, a whole-pixel P-square inside its cell."""
    size = 96
    loader = build_loader("detco", syn[0], 4, backend=backend, num_workers=0, image_size=size, patches="view")
    P = Recipe("detco", image_size=size).cfg["patch"]
    batch = next(iter(loader))
    assert batch["views"].shape[1] == 2                                   # no loader views for patches
    for v in VIEWS:
        boxes, cells = batch[PATCH_BOXES[v].boxes], batch[PATCH_BOXES[v].ids]
        assert torch.allclose(boxes, boxes.round(), atol=1e-3)
        for b in range(4):
            assert sorted(cells[b].tolist()) == list(range(9))
            for slot in range(9):
                x1, y1, x2, y2 = (int(round(t)) for t in boxes[b, slot].tolist())
                r, c = divmod(int(cells[b, slot]), 3)
                assert (x2 - x1, y2 - y1) == (P, P)
                assert c * size / 3 <= x1 and x2 <= (c + 1) * size / 3 and r * size / 3 <= y1 and y2 <= (r + 1) * size / 3
                assert torch.equal(batch[PATCHES[v]][b, slot], batch[v][b, :, y1:y2, x1:x2])
    with pytest.raises(ValueError, match="data.options.patches"):
        Recipe("detco", patches="cells")


# --------------------------------------------------------------------------- 2 ranks == 1
def _ranks_worker(rank, world, init_file, out):
    """Two optimiser steps of the real train_step on a fixed global batch of 4, split over
    the ranks. BN in eval mode (fixed statistics: per-rank train-mode statistics would
    legitimately differ); shuffled BN forced on, so keys go through the cross-rank shuffle
    and must come back in order. Queues fill from the gathered keys in rank order."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from train.optim import build_optimizer, build_scheduler
    from train.pretrain import train_step
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    method = _tiny(queue_size=10, shuffle_bn=True).eval()
    cfg = {"optim": {"base_lr": 0.5, "warmup_steps": 0}}
    opt = build_optimizer(method, cfg, global_batch=4)
    sched = build_scheduler(opt, cfg, total_steps=4, steps_per_epoch=2)
    model = DDP(method) if world > 1 else method
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    per, losses = 4 // world, []
    for step in range(2):
        batch = _batch(B=4, seed=step)
        local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        loss, _ = train_step(model, method, opt, sched, scaler, local, None, step, 4)
        t = torch.tensor([loss])
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    if rank == 0:
        torch.save({"state": method.state_dict(), "losses": losses}, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_shuffled_bn_equal_one_process_on_the_same_global_batch(tmp_path):
    _ranks_worker(0, 1, "", str(tmp_path / "one.pt"))
    run_ranks(_ranks_worker, 2, str(tmp_path / "init"), str(tmp_path / "two.pt"), timeout_s=240)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    for k, v in one["state"].items():                  # online, key encoder and all 8 queues
        torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    torch.manual_seed(0)
    fresh = _tiny(queue_size=10).state_dict()
    assert not torch.equal(fresh["queues.local.res2.keys"], one["state"]["queues.local.res2.keys"])
    assert not torch.equal(fresh["key_backbone.conv1.weight"], one["state"]["key_backbone.conv1.weight"])


# --------------------------------------------------------------------------- the trainer
class Crash(RuntimeError):
    """Stands for a killed process."""


def _run(out: Path, shards: Path, steps: int) -> dict[int, float]:
    cfg = load_config(CONFIGS / "detco_small_cpu.yaml", [
        f"data.shards={shards}", "data.batch_size=4", "data.image_size=48", "model.width=8",
        "model.queue_size=10", "data.backend=reference", "data.num_workers=0", f"train.out={out}",
        f"train.steps={steps}", "train.checkpoint_every=2", "train.log_every=1", "train.tensorboard=false"])
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def test_detco_trains_resumes_to_the_same_losses_and_exports_for_torchvision_and_detectron2(
        tmp_path, syn, monkeypatch):
    shards = syn[0]                                     # 8 samples: 2 steps an epoch of 4
    straight = _run(tmp_path / "straight", shards, 4)
    assert sorted(straight) == [1, 2, 3, 4] and all(math.isfinite(v) for v in straight.values())

    def crash_after_step_2(cfg, info, step):
        if step == 2:
            raise Crash(step)
    monkeypatch.setattr(callbacks, "maybe_fault", crash_after_step_2)
    with pytest.raises(Crash):
        _run(tmp_path / "split", shards, 4)
    monkeypatch.undo()
    resumed = _run(tmp_path / "split", shards, 4)
    for step in (3, 4):                                 # queues (10 keys, 4 a step) wrap during step 3
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    last = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)["model"]
    ref = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in ("queues.global.res5.keys", "queues.local.res2.keys", "queues.local.res2.ptr"):
        torch.testing.assert_close(last[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)

    exported = tmp_path / "straight" / "exported"
    sd = torch.load(exported / "backbone_torchvision.pth", weights_only=True)
    build_backbone("resnet18", width=8).load_state_dict(sd, strict=True)
    assert all(torch.equal(sd[k], ref["backbone." + k]) for k in sd)
    d2 = pickle.loads((exported / "detectron2.pkl").read_bytes())["model"]
    torch.testing.assert_close(torch.from_numpy(d2["stem.conv1.weight"]), ref["backbone.conv1.weight"])
    torch.testing.assert_close(torch.from_numpy(d2["res5.1.conv2.norm.running_var"]),
                               ref["backbone.layer4.1.bn2.running_var"])
    torch.testing.assert_close(torch.from_numpy(d2["res3.0.shortcut.weight"]), ref["backbone.layer2.0.downsample.0.weight"])
    assert len(d2) == len([k for k in sd if not k.endswith("num_batches_tracked")])


def test_the_full_config_builds_the_papers_optimiser_and_heads():
    from train.methods import build_method
    from train.optim import build_optimizer
    cfg = load_config(CONFIGS / "detco_r50.yaml")
    _, method = build_method(cfg)
    opt = build_optimizer(method, cfg, int(cfg["data"]["batch_size"]))
    assert type(opt).__name__ == "SGD" and opt.param_groups[0]["lr"] == pytest.approx(0.03)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-4) and opt.param_groups[0]["momentum"] == 0.9
    assert method.head["local"]["res5"][0].weight.shape == (2048, 9 * 2048)
    assert method.head["global"]["res2"][2].weight.shape == (128, 256)
    assert method.queues["local"]["res4"].keys.shape == (65536, 128) and method.momentum == 0.999
    assert cfg["train"]["epochs"] == 200 and cfg["data"]["batch_size"] == 256
