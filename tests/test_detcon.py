"""DetCon: mask reduction, mask sampling, pooling and the exact DetCon-B/S loss
(methods.md 2.4-2.7), each checked against an independent direct computation
written here (explicit loops in float64 / one-hot average pooling)."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.methods import get
from train.methods.detcon import detcon_loss, gather_targets, masks_to_grid, pool_in_masks, sample_mask_ids

torch.set_num_threads(1)


# --- reference: the formula of methods.md 2.6, one row at a time ------------------------
def _unit(v):
    return v / np.linalg.norm(v)


def reference_side(pred, t_other, t_same, pind, tind_other, tind_same, offset, tau):
    """loss_a of methods.md 2.6 with explicit loops over b, i, b', j."""
    B, M, _ = pred.shape
    Bg = t_other.shape[0]
    total = 0.0
    for b in range(B):
        for i in range(M):
            p = _unit(pred[b, i])
            logits, positive = [], []
            for bp in range(Bg):                       # view-b targets (ab): positives live here
                for j in range(M):
                    logits.append(p @ _unit(t_other[bp, j]) / tau)
                    positive.append(bp == offset + b and pind[b, i] == tind_other[b, j])
            for bp in range(Bg):                       # same-view targets (aa): never positive
                for j in range(M):
                    if bp == offset + b and pind[b, i] == tind_same[b, j]:
                        continue                       # the trivial match is removed from the softmax
                    logits.append(p @ _unit(t_same[bp, j]) / tau)
                    positive.append(False)
            n_pos = sum(positive)
            if n_pos == 0:
                continue                               # unpaired mask: weight 0
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            ce = -sum(x - log_z for x, pos in zip(logits, positive) if pos) / n_pos
            copies = sum(pind[b, j] == pind[b, i] for j in range(M))
            total += ce / copies
    return total / (B * M)                             # zero-weight rows stay in the mean


def reference_loss(pred1, pred2, t1, t2, pind1, pind2, tind1, tind2, offset=0, tau=0.1):
    return (reference_side(pred1, t2, t1, pind1, tind2, tind1, offset, tau)
            + reference_side(pred2, t1, t2, pind2, tind1, tind2, offset, tau))


def _case(seed, B=2, ranks=1, M=6, D=8, n_ids=5):
    """Random predictions/targets and id draws with duplicates and unpaired ids."""
    rng = np.random.default_rng(seed)
    pred1, pred2 = rng.normal(size=(2, B, M, D))
    t1, t2 = rng.normal(size=(2, B * ranks, M, D))
    ids1 = rng.integers(0, n_ids, size=(B, M))
    ids2 = rng.integers(0, n_ids, size=(B, M))
    ids1[0, :3] = [0, 0, 4]          # a duplicate, and id 4 ...
    ids2[0] = np.where(ids2[0] == 4, 1, ids2[0])   # ... never drawn in view 2: unpaired
    return pred1, pred2, t1, t2, ids1, ids2


def _torch(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("seed,ranks,tau", [(0, 1, 0.1), (1, 3, 0.1), (2, 2, 0.5)])
def test_detcon_b_loss_matches_direct_formula(seed, ranks, tau):
    pred1, pred2, t1, t2, ids1, ids2 = _case(seed, ranks=ranks)
    B = pred1.shape[0]
    for rank in range(ranks):                     # this rank's copy sits at rank*B in the gathered batch
        local = slice(rank * B, rank * B + B)
        # the method draws the same ids for online and target: tind = pind (of this rank)
        want = reference_loss(pred1, pred2, t1, t2, ids1, ids2, ids1, ids2, offset=rank * B, tau=tau)
        got = detcon_loss(*_torch(pred1, pred2, t1, t2, ids1, ids2, ids1, ids2), offset=rank * B, temperature=tau)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12), (rank, local)


def test_detcon_loss_with_separate_target_ids():
    """The official function keeps pred and target ids apart; so do we."""
    pred1, pred2, t1, t2, ids1, ids2 = _case(3, ranks=2)
    rng = np.random.default_rng(4)
    tind1, tind2 = rng.integers(0, 5, size=(2,) + ids1.shape)
    want = reference_loss(pred1, pred2, t1, t2, ids1, ids2, tind1, tind2, offset=2)
    got = detcon_loss(*_torch(pred1, pred2, t1, t2, ids1, ids2, tind1, tind2), offset=2)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_duplicates_and_unpaired_masks_change_the_loss_as_the_formula_says():
    """Weight 0 for an id absent from the other view; 1/copies for repeated ids."""
    rng = np.random.default_rng(5)
    pred1, pred2, t1, t2 = rng.normal(size=(4, 1, 4, 8))
    ids1 = np.array([[0, 1, 2, 3]])
    ids2 = np.array([[0, 1, 2, 2]])            # id 3 unpaired in view 1, id 2 duplicated in view 2
    got = detcon_loss(*_torch(pred1, pred2, t1, t2, ids1, ids2, ids1, ids2)).item()
    assert got == pytest.approx(reference_loss(pred1, pred2, t1, t2, ids1, ids2, ids1, ids2), rel=1e-10)
    # moving the unpaired row's prediction anywhere leaves the loss unchanged (its weight is 0) ...
    moved = pred1.copy()
    moved[0, 3] = rng.normal(size=8)
    assert detcon_loss(*_torch(moved, pred2, t1, t2, ids1, ids2, ids1, ids2)).item() == pytest.approx(got, rel=1e-12)
    # ... and every row counts in the denominator: side a = sum of 3 weighted rows / 4
    p1, p2, a1, a2, i1, i2 = _torch(pred1, pred2, t1, t2, ids1, ids2)
    side_a = detcon_loss(p1, p1, a2, a2, i1, i1, i2, i2) / 2   # symmetric call: both sides equal side a
    assert side_a.item() == pytest.approx(reference_side(pred1, t2, t2, ids1, ids2, ids2, 0, 0.1), rel=1e-10)


def test_detcon_s_gradients_flow_through_both_views():
    """DetCon-S uses the projections as both prediction and target: the gradient of
    the shared tensors must match finite differences of the direct formula."""
    rng = np.random.default_rng(6)
    z1, z2 = rng.normal(size=(2, 2, 3, 4))
    ids1 = np.array([[0, 1, 1], [2, 0, 3]])
    ids2 = np.array([[1, 0, 2], [3, 3, 0]])
    a, b = (torch.tensor(z, requires_grad=True) for z in (z1, z2))
    i1, i2 = _torch(ids1, ids2)
    loss = detcon_loss(a, b, a, b, i1, i2, i1, i2, temperature=0.3)
    loss.backward()
    eps = 1e-6
    for src, grad, which in ((z1, a.grad, 0), (z2, b.grad, 1)):
        for idx in [(0, 0, 0), (0, 2, 3), (1, 1, 2)]:
            plus, minus = src.copy(), src.copy()
            plus[idx] += eps
            minus[idx] -= eps
            def f(z):
                zz = (z, z2) if which == 0 else (z1, z)
                return reference_loss(zz[0], zz[1], zz[0], zz[1], ids1, ids2, ids1, ids2, tau=0.3)
            numeric = (f(plus) - f(minus)) / (2 * eps)
            assert grad[idx].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32():
    pred1, pred2, t1, t2, ids1, ids2 = _torch(*_case(8))
    full = detcon_loss(*(t.float() for t in (pred1, pred2, t1, t2)), ids1, ids2, ids1, ids2)
    half = detcon_loss(*(t.bfloat16() for t in (pred1, pred2, t1, t2)), ids1, ids2, ids1, ids2)
    assert half.dtype == torch.float32 and torch.isfinite(half)       # the -1e9 mask survives
    assert half.item() == pytest.approx(full.item(), rel=0.05)


def test_bad_inputs_raise_clear_errors():
    z = torch.randn(2, 3, 4)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        detcon_loss(z, z, z, z, ids, ids, ids, ids, temperature=0.0)
    with pytest.raises(ValueError, match="offset"):
        detcon_loss(z, z, z, z, ids, ids, ids, ids, offset=1)
    with pytest.raises(ValueError, match="negative ids"):
        masks_to_grid(torch.full((1, 8, 8), -1), (2, 2))
    with pytest.raises(ValueError, match="integer"):
        masks_to_grid(torch.zeros(1, 8, 8), (2, 2))


# --- masks on the grid ---------------------------------------------------------------
def test_masks_to_grid_is_area_pool_then_argmax():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 6, (3, 64, 96), generator=g)
    masks[0, :40] = 300                     # a 16-bit id (FH ids above 255 must not wrap)
    masks[1, :32, :32] = 2                  # one cell fully one id
    masks[2, :32, :32] = torch.tensor([[1, 4] * 16] * 32)   # exact tie in that cell: smallest id wins
    cells = masks_to_grid(masks, (2, 3))
    onehot = F.one_hot(masks, 301).permute(0, 3, 1, 2).double()
    want = F.avg_pool2d(onehot, 32).argmax(dim=1)   # official: VALID pool, window = stride, first max
    assert torch.equal(cells, want)
    assert cells[1, 0, 0] == 2 and cells[2, 0, 0] == 1


def test_masks_to_grid_uneven_sizes_assigns_every_pixel_once():
    masks = torch.arange(7 * 10).view(1, 7, 10) // 10       # one id per row
    cells = masks_to_grid(masks, (3, 3))
    # rows 0-2 -> cell row 0 (y*3//7: 0,0,0,1,1,2,2 ... ) majority row ids: 0, 3, 5
    rows = [[y for y in range(7) if y * 3 // 7 == r] for r in range(3)]
    assert [int(cells[0, r, 0]) for r in range(3)] == [rows[r][0] for r in range(3)]


def test_sample_mask_ids_uniform_with_replacement_among_present():
    cells = torch.tensor([[[5, 5, 5], [5, 5, 9], [9, 2, 5]]])          # 3 present ids, unequal areas
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([sample_mask_ids(cells, 16, g) for _ in range(600)], dim=1)[0]
    assert set(draws.tolist()) == {2, 5, 9}
    counts = np.array([(draws == v).sum().item() for v in (2, 5, 9)])
    expected = len(draws) / 3                                         # uniform, not area-weighted
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 13.8, counts                                        # p = 0.001 for 2 dof
    one = sample_mask_ids(cells, 16, torch.Generator().manual_seed(2))
    assert len(set(one[0].tolist())) < 16                             # with replacement: repeats


def test_pool_in_masks_is_mean_inside_each_mask():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    cells = torch.randint(0, 3, (2, 3, 4), generator=g)
    ids = torch.tensor([[0, 2, 2, 1], [1, 1, 0, 2]])
    ids = torch.where(torch.stack([(cells[b] == ids[b, :, None, None]).flatten(1).any(1) for b in range(2)]),
                      ids, cells[:, 0, 0, None].expand_as(ids))   # only present ids, as sampling guarantees
    got = pool_in_masks(feats, cells, ids)
    for b in range(2):
        for m in range(ids.shape[1]):
            inside = [feats[b, :, y, x] for y in range(3) for x in range(4) if cells[b, y, x] == ids[b, m]]
            assert torch.allclose(got[b, m], torch.stack(inside).mean(0))


# --- a real 2-process gloo group -------------------------------------------------------
def run_ranks(worker, world: int, *args, timeout_s: float = 120) -> None:
    """Run `worker(rank, world, *args)` in `world` forked processes (fast: no fresh torch
    import) and fail instead of hanging if they do not finish in time."""
    ctx = mp.start_processes(worker, args=(world, *args), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} gloo ranks did not finish within {timeout_s}s")


def _gloo_worker(rank, world, init_file, arrays, out_dir):
    """One rank: DetCon-B loss on gathered targets; DetCon-S loss and gradients through
    the differentiable gather. Writes its results for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred1, pred2, t1, t2, ids1, ids2 = _torch(*arrays)
        B = len(ids1) // world
        mine = slice(rank * B, rank * B + B)
        (g1, g2), offset = gather_targets([t1[mine], t2[mine]])
        loss_b = detcon_loss(pred1[mine], pred2[mine], g1, g2, ids1[mine], ids2[mine], ids1[mine], ids2[mine],
                             offset=offset)
        z1, z2 = (t[mine].clone().requires_grad_(True) for t in (t1, t2))
        (g1, g2), offset = gather_targets([z1, z2])
        loss_s = detcon_loss(z1, z2, g1, g2, ids1[mine], ids2[mine], ids1[mine], ids2[mine], offset=offset)
        loss_s.backward()
        torch.save(dict(offset=offset, loss_b=loss_b.item(), loss_s=loss_s.item(), grad1=z1.grad, grad2=z2.grad),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_gather_targets_and_route_detcon_s_gradients(tmp_path):
    world, B = 2, 2
    rng = np.random.default_rng(7)
    pred1, pred2, t1, t2 = rng.normal(size=(4, world * B, 5, 6))
    ids1, ids2 = rng.integers(0, 4, size=(2, world * B, 5))
    arrays = (pred1, pred2, t1, t2, ids1, ids2)
    run_ranks(_gloo_worker, world, str(tmp_path / "init"), arrays, str(tmp_path))
    # reference in one process: DetCon-S's objective is the sum of the per-rank losses
    z1, z2 = (torch.tensor(t, requires_grad=True) for t in (t1, t2))
    i1, i2 = _torch(ids1, ids2)
    total = 0
    for rank in range(world):
        mine = slice(rank * B, rank * B + B)
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["offset"] == rank * B
        want_b = reference_loss(pred1[mine], pred2[mine], t1, t2, ids1[mine], ids2[mine], ids1[mine], ids2[mine],
                                offset=rank * B)
        want_s = reference_loss(t1[mine], t2[mine], t1, t2, ids1[mine], ids2[mine], ids1[mine], ids2[mine],
                                offset=rank * B)
        assert got["loss_b"] == pytest.approx(want_b, rel=1e-10)
        assert got["loss_s"] == pytest.approx(want_s, rel=1e-10)
        total = total + detcon_loss(z1[mine], z2[mine], z1, z2, i1[mine], i2[mine], i1[mine], i2[mine],
                                    offset=rank * B)
    total.backward()
    for rank in range(world):
        mine = slice(rank * B, rank * B + B)
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # each rank's rows get the gradient of *both* ranks' losses (the other rank's through the gather)
        assert torch.allclose(got["grad1"], z1.grad[mine], rtol=1e-9, atol=1e-12)
        assert torch.allclose(got["grad2"], z2.grad[mine], rtol=1e-9, atol=1e-12)


# --- the method (tiny random-weight ResNet-18) ------------------------------------------
def _detcon(variant):
    return get("detcon").build({"model": {"backbone": "resnet18", "width": 8, "variant": variant,
                                          "hidden_dim": 32, "dim": 16, "num_samples": 6}})


def _views(seed=0, B=3, size=64):
    g = torch.Generator().manual_seed(seed)
    grid = (torch.arange(size)[:, None] // 32) * 2 + torch.arange(size)[None] // 32    # 2x2 blocks, ids 0..3
    return {"view1": torch.randn(B, 3, size, size, generator=g), "view2": torch.randn(B, 3, size, size, generator=g),
            "mask1": grid.expand(B, size, size).clone(), "mask2": (3 - grid).expand(B, size, size).clone()}


def test_detcon_b_step_pools_the_same_ids_online_and_target():
    torch.manual_seed(0)
    model, batch = _detcon("b"), _views()
    torch.manual_seed(5)
    out = model(batch)
    torch.manual_seed(5)                        # the forward's only random draw is the id sampling
    with torch.no_grad():
        maps = [model.backbone.features(batch[v])[-1] for v in ("view1", "view2")]
        cells = [masks_to_grid(batch[m], (2, 2)) for m in ("mask1", "mask2")]
        ids = [sample_mask_ids(c, 6) for c in cells]
        pred = [model.predictor(model.projector(pool_in_masks(f, c, i).flatten(0, 1))).view(3, 6, -1)
                for f, c, i in zip(maps, cells, ids)]
        target = [model.target_projector(pool_in_masks(model.target_backbone.features(batch[v])[-1], c, i)
                                         .flatten(0, 1)).view(3, 6, -1)
                  for v, c, i in zip(("view1", "view2"), cells, ids)]
    want = detcon_loss(pred[0], pred[1], target[0], target[1], ids[0], ids[1], ids[0], ids[1])
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["masks_per_image"] == 4
    out["loss"].backward()
    assert all(p.grad is None for p in model.target_backbone.parameters())
    assert model.predictor[0].weight.grad.abs().sum() > 0


def test_detcon_b_target_follows_the_cosine_ema_and_lars_skips_1d():
    model = _detcon("b")
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    before, online = model.target_backbone.conv1.weight.clone(), model.backbone.conv1.weight.clone()
    model.momentum_update(step=3, total_steps=10)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert torch.allclose(model.target_backbone.conv1.weight, m * before + (1 - m) * online)
    decay, no_decay = model.param_groups(1.5e-6)
    assert model.optimizer == "lars" and decay["lars"] and not no_decay["lars"] and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert model.projector[-1].bias is None                 # DetCon's last projector layer has no bias


def test_detcon_s_shares_one_encoder_and_trains_through_both_views():
    torch.manual_seed(0)
    model = _detcon("s")
    assert not hasattr(model, "target_backbone") and not hasattr(model, "predictor")
    grads = []
    for view in ("view1", "view2"):             # gradient reaches the input of each view
        batch = _views(1)
        batch[view].requires_grad_(True)
        torch.manual_seed(2)
        model(batch)["loss"].backward()
        grads.append(batch[view].grad.abs().sum().item())
    assert min(grads) > 0
    with pytest.raises(NotImplementedError, match="no EMA target"):   # what export/eval catch
        model.export_modules(target=True)
    with pytest.raises(ValueError, match="variant"):
        _detcon("x")
