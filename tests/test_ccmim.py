"""ccMIM on a tiny timm ViT with random weights (nothing is downloaded): the attention-guided mask
against attention written out by hand from the qkv weights, MAE's reconstruction loss and
patch layout on constructed cases, the alignment loss against a direct loop and against a
hand-written encoder pass, the cross-rank key gather on two gloo ranks, AdamW's groups, the noise
generator, the ccmim recipe on both loader backends against PIL's bicubic resize, and runs through
train/pretrain.py: resume on both backends, the export loaded into timm, two torchrun ranks."""
from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.test_detcon import run_ranks
from tests.test_trainer_seams import CONFIGS, _run
from train.methods import get
from train.methods.ccmim import alignment_loss
from train.models.mae import patchify, reconstruction_loss, sincos_2d

torch.set_num_threads(1)
TINY = dict(backbone="vit_tiny_patch16_224", decoder_dim=32, decoder_depth=1, decoder_heads=4, proj_dim=16,
            backbone_options=dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4))
L, KEEP = 16, 4          # 32 px / 8 px patches = 4 x 4; int(16 x 0.25) visible


def _method(**over):
    torch.manual_seed(0)
    return get("ccmim").build({"model": {**TINY, **over}})


# --- the encoder written out by hand (independent of timm's modules' forward) -------------
def _hand_embed(vit, images):
    """(CLS [B,1,D], patches [B,L,D]): patch convolution as a matrix product over each patch's
    pixels, position rows added (row 0 = CLS)."""
    p = 8
    B, C, H, W = images.shape
    cols = images.unfold(2, p, p).unfold(3, p, p)                      # B C h w p p
    cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)
    w = vit.patch_embed.proj.weight.reshape(vit.embed_dim, -1)
    patches = cols @ w.t() + vit.patch_embed.proj.bias + vit.pos_embed[0, 1:]
    cls = (vit.cls_token[0, 0] + vit.pos_embed[0, 0]).expand(B, 1, -1)
    return cls, patches


def _hand_blocks(vit, x):
    """Run x [B,N,D] through every block by hand; returns (output after the final norm,
    per-block head-averaged attention of the CLS row over all N keys)."""
    cls_rows = []
    for blk in vit.blocks:
        a = blk.attn
        heads = a.num_heads
        hd = x.shape[-1] // heads
        n1 = F.layer_norm(x, (x.shape[-1],), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = n1 @ a.qkv.weight.t() + a.qkv.bias
        q, k, v = qkv.split(x.shape[-1], dim=-1)
        outs, cls_attn = [], 0
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
            prob = torch.exp(logits - logits.amax(-1, keepdim=True))
            prob = prob / prob.sum(-1, keepdim=True)
            cls_attn = cls_attn + prob[:, 0] / heads
            outs.append(prob @ v[..., sl])
        x = x + torch.cat(outs, -1) @ a.proj.weight.t() + a.proj.bias
        n2 = F.layer_norm(x, (x.shape[-1],), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        hidden = F.gelu(n2 @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias)
        x = x + hidden @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
        cls_rows.append(cls_attn)
    out = F.layer_norm(x, (x.shape[-1],), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    return out, cls_rows


def _masked_sets(method, images, noise):
    with torch.no_grad():
        cls, patches = method.embed(images)
        _, ids_mask, mask, _ = method.choose(cls, patches, noise)
    return [set(r.tolist()) for r in ids_mask], mask


def test_with_the_noise_removed_the_mask_takes_exactly_the_most_attended_patches():
    method = _method()
    vit = method.backbone.vit
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls, patches = _hand_embed(vit, images)
        _, rows = _hand_blocks(vit, torch.cat([cls, patches], 1))
    a = sum(r[:, 1:] for r in rows)                                      # CLS -> patch, summed over blocks
    got, mask = _masked_sets(method, images, torch.zeros(3, L))
    for b in range(3):
        want = set(torch.topk(a[b], L - KEEP).indices.tolist())
        assert got[b] == want and len(want) == 12
        assert mask[b].tolist() == [float(j in want) for j in range(L)]
    # with noise u the order is that of a - u (softmax(a)/softmax(u) = e^(a-u) x a per-image constant)
    u = torch.rand(3, L)
    got, _ = _masked_sets(method, images, u)
    assert got == [set(torch.topk(a[b] - u[b], L - KEEP).indices.tolist()) for b in range(3)]
    # random masking (MAE) hides the patches of highest noise, whatever the attention
    got, _ = _masked_sets(_method(masking="random"), images, u)
    assert got == [set(torch.topk(u[b], L - KEEP).indices.tolist()) for b in range(3)]


def test_the_importance_pass_removes_its_hooks_and_leaves_gradients_untouched():
    method = _method()
    attns = [blk.attn for blk in method.backbone.vit.blocks]
    out = method({"image": torch.randn(4, 3, 32, 32)})
    assert all(not a.qkv._forward_hooks for a in attns)
    out["loss"].backward()
    assert method.backbone.vit.pos_embed.grad is None                   # fixed sin-cos, frozen
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


def test_patchify_and_the_sincos_table_follow_maes_layout():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    got = patchify(images, 4)
    assert got.shape == (2, 4, 48)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                for r in range(4):
                    for s in range(4):
                        for c in range(3):
                            assert got[b, i * 2 + j, (r * 4 + s) * 3 + c] == images[b, c, 4 * i + r, 4 * j + s]
    table = sincos_2d(8, 2, 3)
    assert table.shape == (1, 7, 8) and torch.all(table[0, 0] == 0)
    for row in range(2):
        for col in range(3):
            want = []
            for pos in (col, row):                                       # first half: column; second: row
                freqs = [1 / 10000 ** (i / 2) for i in range(2)]
                want += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
            torch.testing.assert_close(table[0, 1 + row * 3 + col], torch.tensor(want, dtype=torch.float32))


def test_reconstruction_loss_equals_maes_formula_on_a_constructed_case():
    torch.manual_seed(1)
    target = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    # norm_pix with a zero prediction: each hidden patch costs (n-1)/n x var/(var + 1e-6)
    var = target.var(-1)
    want = sum((47 / 48) * var[b, j] / (var[b, j] + 1e-6) for b, j in [(0, 0), (0, 2), (1, 3)]) / 3
    assert reconstruction_loss(torch.zeros_like(target), target, mask).item() == pytest.approx(want.item(), rel=1e-5)
    # raw pixels: only the hidden patches count, each by its mean squared error
    pred = target + torch.arange(4.0)[None, :, None]                     # patch j off by j everywhere
    want = (0 ** 2 + 2 ** 2 + 3 ** 2) / 3
    assert reconstruction_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(want, rel=1e-6)


def _direct_infonce(q, k, T, offset=0):
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / T for j in range(len(k))]
        top = max(logits)
        total += -(logits[i + offset] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(q) * 2 * T


def test_alignment_loss_matches_a_direct_computation():
    torch.manual_seed(2)
    q, k = (F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1) for _ in range(2))
    for T in (0.5, 0.2):
        loss, acc = alignment_loss(q, k, T)
        assert loss.item() == pytest.approx(_direct_infonce(q, k, T), rel=1e-6)
        assert acc.item() == pytest.approx(np.mean([int(torch.argmax(q[i] @ k.t())) == i for i in range(6)]))


def test_the_two_encoder_passes_and_the_projector_give_the_logged_alignment_loss():
    """The method's alignment term from the hand encoder on the visible and the masked sets."""
    method = _method()
    vit = method.backbone.vit
    images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, L)
    with torch.no_grad():
        cls, patches = method.embed(images)
        ids_vis, ids_mask, _, _ = method.choose(cls, patches, noise)
        hcls, hpatches = _hand_embed(vit, images)
        branch = [_hand_blocks(vit, torch.cat([hcls, hpatches[torch.arange(4)[:, None], ids]], 1))[0][:, 0]
                  for ids in (ids_vis, ids_mask)]
        q, k = (F.normalize(method.projector(z), dim=1) for z in branch)   # train-mode BN: batch statistics
    out = method({"image": images}, noise=noise)
    assert out["align"] == pytest.approx(_direct_infonce(q.double(), k.double(), 0.5), rel=1e-4)
    assert out["loss"].item() == pytest.approx(out["rec"] + 0.1 * out["align"], rel=1e-6)


def _gloo_worker(rank, world, init_file, q, k, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        B = len(q) // world
        mine = slice(rank * B, rank * B + B)
        qq, kk = q[mine].clone().requires_grad_(True), k[mine].clone().requires_grad_(True)
        loss, _ = alignment_loss(qq, kk, 0.5)
        loss.backward()
        torch.save(dict(loss=loss.item(), grad=qq.grad, key_grad=kk.grad), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    world, B = 2, 3
    torch.manual_seed(3)
    q, k = (F.normalize(torch.randn(world * B, 8, dtype=torch.float64), dim=1) for _ in range(2))
    run_ranks(_gloo_worker, world, str(tmp_path / "init"), q, k, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    qq = q.clone().requires_grad_(True)
    whole, _ = alignment_loss(qq, k, 0.5)                                 # one process, global batch
    whole.backward()
    assert np.mean([g["loss"] for g in got]) == pytest.approx(whole.item(), rel=1e-10)
    for r, g in enumerate(got):
        assert g["loss"] == pytest.approx(_direct_infonce(q[r * B:(r + 1) * B], k, 0.5, offset=r * B), rel=1e-8)
        # DDP averages the ranks' gradients: rank r's rows carry world x their share of the global mean
        torch.testing.assert_close(g["grad"] / world, qq.grad[r * B:(r + 1) * B])
        assert g["key_grad"] is None                                      # keys are gathered without gradient


# --- the recipe on both backends ----------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "dali"])
def test_the_ccmim_recipe_is_one_bicubic_random_resized_crop_with_flips_and_no_colour(sample_shards, backend):
    from PIL import Image

    from shards.reader import ShardDataset
    from train.loader import build_loader
    from train.loader.collate import MEAN, STD
    loader = build_loader("ccmim", sample_shards, batch_size=7, backend=backend, num_workers=0 if
                          backend == "reference" else 1, seed=0, image_size=64)
    batch = next(iter(loader))
    assert set(batch) == {"image", "views", "index"} and batch["image"].shape == (7, 3, 64, 64)
    ds = ShardDataset(sample_shards)
    keys = ds.keys
    errors = {Image.BICUBIC: [], Image.BILINEAR: []}
    for i in range(7):
        x0, y0, w, h, flip = batch["views"][i, 0].tolist()
        source = Image.open(io.BytesIO(ds.get(keys[int(batch["index"][i])]).jpeg)).convert("RGB")
        assert 0.2 - 1e-3 <= w * h / (source.width * source.height) <= 1 + 1e-3
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        got = (batch["image"][i].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255
        for interp, errs in errors.items():
            want = np.asarray(source.resize((64, 64), interp, box=(x0, y0, x0 + w, y0 + h)), np.float32)
            errs.append(np.abs(got - (want[:, ::-1] if flip else want)).mean())
    cubic, linear = (np.mean(e) for e in errors.values())                # mean 0-255 levels; no colour change
    # measured: reference 0.03 vs 0.78 (torchvision's bicubic is PIL's); DALI 1.5 vs 2.0 (its cubic
    # resize of a DCT-reduced decode)
    assert cubic < {"reference": 0.25, "dali": 2.5}[backend] and cubic < linear, (cubic, linear)
    flips = [bool(v[0, 4]) for b in loader for v in b["views"]]
    assert any(flips) and not all(flips)


# --- through train/pretrain.py -------------------------------------------------------------
@pytest.mark.parametrize("backend", ["dali", "reference"])
def test_resume_gives_the_same_next_losses_as_the_uninterrupted_run(sample_shards, tmp_path, backend):
    """Both backends: the noise u has its own generator keyed by (seed, rank, forwards so far)."""
    small = (f"data.backend={backend}", "data.num_workers=1" if backend == "dali" else "data.num_workers=0")
    straight = _run(tmp_path / "straight", sample_shards, "train.steps=4", *small, config="ccmim_small_cpu")
    _run(tmp_path / "split", sample_shards, "train.steps=2", *small, config="ccmim_small_cpu")
    resumed = _run(tmp_path / "split", sample_shards, "train.steps=4", *small, config="ccmim_small_cpu")
    assert sorted(straight) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == straight[step]["loss"]
        assert {"rec", "align", "acc"} <= set(straight[step])


def test_a_few_steps_on_dali_export_a_backbone_that_timm_loads_with_the_same_features(sample_shards, tmp_path):
    import timm

    _run(tmp_path, sample_shards, "train.steps=2", "data.backend=dali", "data.num_workers=1", "export.enabled=true",
         "model.masking=random", config="ccmim_small_cpu")
    meta = json.loads((tmp_path / "exported" / "backbone_timm.json").read_text())
    loaded = timm.create_model(meta["name"], pretrained=False, num_classes=0, **meta["kwargs"])
    loaded.load_state_dict(torch.load(tmp_path / "exported" / "backbone_timm.pth", weights_only=True), strict=True)
    from train.config import load_config
    method = get("ccmim").build(load_config(CONFIGS / "ccmim_small_cpu.yaml", []))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"]
    method.load_state_dict(state)
    method.eval(), loaded.eval()
    x = torch.randn(2, 3, 64, 64)
    feats = method.backbone.forward_features(x)
    tokens = loaded.forward_features(x)
    torch.testing.assert_close(tokens[:, 0], feats["cls"])
    torch.testing.assert_close(tokens[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8), feats["tokens"])
    torch.testing.assert_close(loaded.pos_embed, sincos_2d(64, 8, 8))      # the fixed table travels


def test_the_token_grid_gives_object_crops_by_roialign_and_cls_and_mean_pooled_features():
    """What ViT probes need from forward_features: CLS, mean-pooled tokens, and RoIAlign on the
    token grid at stride = patch (a box on patch edges averages exactly the tokens it covers)."""
    from torchvision.ops import roi_align
    method = _method()
    method.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = method.backbone.forward_features(x)
        stride = method.backbone.feature_info[-1]["stride"]
        boxes = torch.tensor([[0, 0.0, 0, 16, 16], [1, 8, 16, 24, 32]])   # (image, x1, y1, x2, y2) in pixels
        crops = roi_align(feats["tokens"], boxes, output_size=1, spatial_scale=1 / stride, sampling_ratio=2,
                          aligned=True)[..., 0, 0]
    t = feats["tokens"]
    torch.testing.assert_close(crops[0], t[0, :, 0:2, 0:2].mean((1, 2)))
    torch.testing.assert_close(crops[1], t[1, :, 2:4, 1:3].mean((1, 2)))
    torch.testing.assert_close(feats["cls"], method.backbone(x))
    assert t.mean((2, 3)).shape == feats["cls"].shape == (2, 32)


def test_a_resnet_or_a_view_size_other_than_the_vits_is_refused_naming_the_keys():
    from train.schema import ConfigError
    with pytest.raises(ValueError, match="model.backbone must be a vit_\\* name, got a resnet backbone"):
        get("ccmim").build({"model": {"backbone": "resnet18", "width": 8}})
    with pytest.raises(ConfigError, match=r"data.image_size=64 but the ViT was built for 32x32 images: set "
                                          r"model.backbone_options.img_size=64"):
        get("ccmim").build({"model": TINY, "data": {"image_size": 64}})
    with pytest.raises(ValueError, match="model.mask_ratio=0.99 leaves 0 of 16 patches visible"):
        _method(mask_ratio=0.99)


def test_the_noise_follows_seed_and_forward_count_and_its_counter_is_in_the_state_dict():
    a, b = _method(), _method()
    first = a.draw_noise((2, L), torch.device("cpu"))
    torch.rand(5)                                                         # the global RNG plays no part
    assert torch.equal(b.draw_noise((2, L), torch.device("cpu")), first)
    assert not torch.equal(a.draw_noise((2, L), torch.device("cpu")), first)   # the next forward's u
    assert int(a.state_dict()["draws"]) == 2
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.draw_noise((2, L), torch.device("cpu")), a.draw_noise((2, L), torch.device("cpu")))
    c = _method()
    c.seed = 1
    assert not torch.equal(c.draw_noise((2, L), torch.device("cpu")), first)


def test_two_torchrun_ranks_train_ccmim_with_ddp_and_export(sample_shards, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "train/pretrain.py", "--config", str(CONFIGS / "ccmim_small_cpu.yaml"), f"train.out={tmp_path}",
           f"data.shards={sample_shards}", "data.batch_size=4", "train.steps=2", "train.log_every=1",
           "train.tensorboard=false", "data.backend=dali"]
    proc = subprocess.run(cmd, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "start" and r["world_size"] == 2 for r in records)
    steps = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["align"]) for r in steps)
    assert (tmp_path / "exported" / "backbone_timm.pth").is_file()


def test_adamw_decays_only_weight_matrices_at_the_scaled_paper_lr():
    from train.config import load_config
    from train.optim import build_optimizer
    cfg = load_config(CONFIGS / "ccmim_vit_b16.yaml", [])
    method = _method()
    opt = build_optimizer(method, cfg, 4096)
    assert type(opt).__name__ == "AdamW" and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.5e-4 * 4096 / 256)
    named = {id(p): n for n, p in method.named_parameters()}
    decayed = {named[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    exempt = {named[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"backbone.vit.cls_token", "decoder.mask_token", "backbone.vit.norm.weight", "decoder.pred.bias",
            "projector.1.weight"} <= exempt
    assert {"backbone.vit.blocks.0.attn.qkv.weight", "backbone.vit.patch_embed.proj.weight", "decoder.embed.weight",
            "projector.0.weight"} <= decayed
    assert all(named[id(p)].endswith("weight") and p.ndim >= 2 for g in opt.param_groups
               if g["weight_decay"] for p in g["params"])
    assert "backbone.vit.pos_embed" not in decayed | exempt                # frozen: not optimised at all
    assert method.sync_bn is False
