"""The evaluation's probes on constructed inputs with known answers: weighted kNN votes,
the logistic-regression probe's optimum, bootstrap intervals, object-crop features by
hand, and a random-init baseline that is the same in every run with the same seed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.eval import bootstrap, knn, linear
from train.eval.data import LabelledSet, letterbox, split_by_key
from train.eval.features import extract
from train.eval.probes import random_init_backbone, run_probes
from train.models.backbone import build_backbone


def _direct_knn(bank, labels, queries, k, t):
    """One query at a time, plain Python: cosine, top k, sum exp(s/t) per label."""
    out = []
    for q in queries.tolist():
        sims = []
        for b, y in zip(bank.tolist(), labels.tolist()):
            dot = sum(a * c for a, c in zip(q, b))
            sims.append((dot / math.sqrt(sum(a * a for a in q) * sum(c * c for c in b)), y))
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for s, y in sims[:k]:
            votes[y] = votes.get(y, 0.0) + math.exp(s / t)
        best = max(votes.values())
        out.append(min(y for y, v in votes.items() if v == best))
    return out


def test_knn_weighted_vote_lets_one_very_close_neighbour_outvote_two_far_ones():
    # k=3 neighbours of the query (1, 0): label 7 at cosine 0.99, label 3 twice at cosine 0.5
    bank = torch.tensor([[0.99, math.sqrt(1 - 0.99 ** 2)], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)],
                         [-1.0, 0.0]])
    labels = torch.tensor([7, 3, 3, 3])
    q = torch.tensor([[2.0, 0.0]])                        # scale does not matter: cosine
    assert knn.knn_predict(bank, labels, q, k=3, temperature=0.07).tolist() == [7]   # e^14.1 > 2 e^7.1
    assert knn.knn_predict(bank, labels, q, k=3, temperature=10.0).tolist() == [3]   # ~ majority vote
    assert knn.knn_predict(bank, labels, q, k=1, temperature=10.0).tolist() == [7]


def test_knn_matches_a_direct_loop_on_random_features():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 5, generator=g), torch.randn(25, 5, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g) * 2 + 1      # labels 1, 3, 5, 7
    for k, t in ((20, 0.07), (5, 0.5), (100, 0.07)):             # k above the bank size: all of it
        assert knn.knn_predict(bank, labels, queries, k=k, temperature=t, chunk=7).tolist() == \
            _direct_knn(bank, labels, queries, min(k, 60), t)


def test_linear_probe_separates_clusters_and_keeps_the_label_values():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + 0.5 * torch.randn(120, 4, generator=g) + 100.0    # far from zero: standardised
    labels = torch.tensor([2, 5, 9])[y]
    probe = linear.fit_linear(x[::2], labels[::2])
    assert probe.predict(x[1::2]).tolist() == labels[1::2].tolist()


def test_linear_probe_weights_are_the_penalised_optimum_by_a_direct_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(90, 3, generator=g) * torch.tensor([1.0, 3.0, 0.2])
    y = (x[:, 0] + 0.3 * torch.randn(90, generator=g) > 0).long() + (x[:, 1] > 2).long()   # 3 classes
    p = linear.fit_linear(x, y)
    z = ((x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)).numpy()
    w, b = p.weight.numpy(), p.bias.numpy()
    gw, gb = linear.L2 * w.copy(), np.zeros_like(b)
    for zi, yi in zip(z, y.tolist()):          # gradient of mean CE + L2/2 |W|^2, one item at a time
        s = w @ zi + b
        e = np.exp(s - s.max())
        prob = e / e.sum()
        prob[yi] -= 1.0
        gw += np.outer(prob, zi) / len(z)
        gb += prob / len(z)
    assert np.abs(gw).max() < 1e-6 and np.abs(gb).max() < 1e-6
    assert np.abs(w).max() > 0.5               # not the trivial zero solution


def test_bootstrap_interval_has_the_binomial_width_and_paired_difference_of_equal_vectors_is_zero():
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.5
    ci = bootstrap.accuracy_ci(correct)
    half = 1.96 * math.sqrt(ci["acc"] * (1 - ci["acc"]) / 400)
    assert ci["lo"] < ci["acc"] < ci["hi"]
    assert (ci["hi"] - ci["lo"]) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap.accuracy_ci(correct) == ci                           # fixed seed
    same = bootstrap.paired_diff_ci(correct, correct)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    better = correct | (rng.random(400) < 0.3)                            # a superset of correct items
    d = bootstrap.paired_diff_ci(better, correct)
    assert d["lo"] > 0 and d["diff"] == pytest.approx(better.mean() - correct.mean())
    # the paired interval is narrower than one from independent resamples of the two
    ia, ib = bootstrap.accuracy_ci(better), bootstrap.accuracy_ci(correct)
    assert d["hi"] - d["lo"] < (ia["hi"] - ia["lo"]) + (ib["hi"] - ib["lo"])


def _set(images, boxes, box_image, box_labels, image_labels=None) -> LabelledSet:
    n = len(images)
    return LabelledSet("constructed", [f"{i:04d}" for i in range(n)], np.asarray(images),
                       np.asarray(image_labels if image_labels is not None else [0] * n, np.int64),
                       np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(box_image, np.int64),
                       np.asarray(box_labels, np.int64))


def test_object_features_equal_the_mean_of_the_feature_map_over_an_axis_aligned_box():
    torch.manual_seed(0)
    net = build_backbone("resnet18", width=8, zero_init_residual=False).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 256, 256, 3), dtype=np.uint8)
    # 14 cells on a side at its level: 7 RoIAlign bins of 2 samples each land on cell centres
    boxes = [(4, 8, 60, 64), (16, 32, 240, 256), (0, 0, 56, 56)]   # res2 (stride 4), C4 (16), res2
    feats = extract(net, _set(images, boxes, [2, 0, 1], [1, 2, 3]), ["res2", "C4"], batch_size=2)
    from train.eval.data import to_tensor_batch
    with torch.no_grad():
        maps = net.forward_features(to_tensor_batch(images))
    by_hand = [maps["res2"][2, :, 2:16, 1:15].mean((1, 2)), maps["res4"][0, :, 2:16, 1:15].mean((1, 2)),
               maps["res2"][1, :, 0:14, 0:14].mean((1, 2))]
    for i, lv in ((0, "res2"), (1, "C4"), (2, "res2")):
        assert torch.allclose(feats["object"][lv][i], by_hand[i], atol=1e-5), (i, lv)
    assert torch.allclose(feats["image"]["C4"], maps["res4"].mean((2, 3)), atol=1e-5)
    assert net.training is False               # extract restores the mode it found


def test_object_crop_features_equal_the_features_of_the_crop_cut_out_by_hand():
    """A ramp image (channel 0 = x, channel 1 = y): bilinear sampling of a linear function is
    exact, so the crop's pixel (i, j) is the ramp at its bin centre, computed here by hand."""
    torch.manual_seed(0)
    net = build_backbone("resnet18", width=8, zero_init_residual=False).eval()
    yy, xx = np.mgrid[0:256, 0:256]
    images = np.stack([xx, yy, np.full_like(xx, 90)], -1).astype(np.uint8)[None].repeat(2, 0)
    images[1] = images[1][::-1]                     # the second image ramps the other way in y
    boxes = [(10, 20, 74, 52), (100.5, 30, 164.5, 126), (40, 40, 72, 72)]
    size = 32
    from train.eval.data import to_tensor_batch
    t = to_tensor_batch(images)
    by_hand = []
    for (x1, y1, x2, y2), b in zip(boxes, (0, 1, 1)):
        u = torch.tensor(x1 + (np.arange(size) + 0.5) * (x2 - x1) / size - 0.5, dtype=torch.float32)
        v = torch.tensor(y1 + (np.arange(size) + 0.5) * (y2 - y1) / size - 0.5, dtype=torch.float32)
        img = t[b]
        ax, bx = img[0, 0, 1] - img[0, 0, 0], img[0, 0, 0]                  # normalised = a * index + b
        ay, by = img[1, 1, 0] - img[1, 0, 0], img[1, 0, 0]
        crop = torch.stack([(ax * u + bx)[None, :].expand(size, size), (ay * v + by)[:, None].expand(size, size),
                            img[2, 0, 0].expand(size, size)])
        by_hand.append(crop)
    feats = extract(net, _set(images, boxes, [0, 1, 1], [1, 2, 3]), ["res3", "C5"], batch_size=2, crop_size=size)
    with torch.no_grad():
        maps = net.forward_features(torch.stack(by_hand))
    for lv, real in (("res3", "res3"), ("C5", "res5")):
        assert torch.allclose(feats["crop"][lv], maps[real].mean((2, 3)), atol=1e-4), lv
    assert "crop" not in extract(net, _set(images, boxes, [0, 1, 1], [1, 2, 3]), ["res3"])  # off by default
    only = extract(net, _set(images, boxes, [0, 1, 1], [1, 2, 3]), ["res3"], crop_size=size, whole=False)
    assert set(only) == {"crop"} and torch.allclose(only["crop"]["res3"], feats["crop"]["res3"])


def test_a_vits_cls_level_is_its_cls_embedding_of_the_image_and_of_each_crop_and_has_no_box_feature():
    """A tiny ViT (random weights): the "cls" level is what the network outputs, net(x), for the
    whole image and for each crop cut out as the crop probe cuts it; a box has no CLS of its own,
    so the object scope has no cls entry and run_probes says it skips it."""
    from train.eval.data import to_tensor_batch
    from train.eval.features import all_levels, crop_boxes
    from train.models.registry import create_backbone
    torch.manual_seed(0)
    net = create_backbone("vit_tiny_patch16_224", options=dict(img_size=64, patch_size=8, embed_dim=32, depth=2,
                                                               num_heads=2, dynamic_img_size=True)).eval()
    assert all_levels(net) == ["tokens", "cls"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 96, 96, 3), dtype=np.uint8)
    boxes, box_image = [(8, 8, 56, 40), (30.5, 20, 90, 88), (0, 0, 96, 96)], [0, 1, 1]
    data = _set(images, boxes, box_image, [1, 2, 1], image_labels=[1, 2])
    feats = extract(net, data, ["tokens", "cls"], batch_size=2, crop_size=32)
    x = to_tensor_batch(images)
    with torch.no_grad():
        whole = net(x)
        cuts = net(crop_boxes(x, torch.tensor(boxes, dtype=torch.float32), torch.tensor(box_image), 32))
        grid = net.forward_features(x)["tokens"]
    assert torch.allclose(feats["image"]["cls"], whole, atol=1e-5)
    assert torch.allclose(feats["crop"]["cls"], cuts, atol=1e-5)
    assert torch.allclose(feats["image"]["tokens"], grid.mean((2, 3)), atol=1e-5)   # the map level unchanged
    assert not torch.allclose(feats["image"]["cls"], feats["image"]["tokens"])
    assert set(feats["object"]) == {"tokens"}
    said = []
    out = run_probes({"pretrained": net, "random": net}, data, data, ["tokens", "cls"], k=1, crop_size=32,
                     say=said.append)
    rows = {(r["scope"], r["level"]) for r in out["results"]}
    assert ("crop", "cls") in rows and ("image", "cls") in rows and ("object", "tokens") in rows
    assert ("object", "cls") not in rows
    assert any("object scope of cls skipped" in s for s in said)


def test_letterbox_keeps_the_aspect_and_pads_with_the_mean_colour():
    rgb = np.full((50, 100, 3), 200, np.uint8)
    out, scale = letterbox(rgb, 64)
    assert scale == pytest.approx(0.64) and out.shape == (64, 64, 3)
    assert (out[:32] == 200).all() and (out[32:] == np.array([124, 116, 104])).all()


def test_split_by_key_is_deterministic_and_independent_of_the_other_keys():
    images = np.zeros((40, 8, 8, 3), np.uint8)
    data = _set(images, [(0, 0, 4, 4)] * 40, range(40), [1] * 40)
    tr, te = split_by_key(data, 0.5)
    tr2, te2 = split_by_key(data.subset(range(20)), 0.5)
    assert set(te2.keys) == set(te.keys) & set(data.keys[:20]) and set(tr2.keys) | set(te2.keys) == set(data.keys[:20])
    assert 10 <= len(te.keys) <= 30 and len(te.box_labels) == len(te.keys)


SMALL = {"method": "mocov2", "model": {"backbone": "resnet18", "width": 8, "dim": 16, "queue_size": 16}}


def test_random_baseline_is_identical_across_runs_with_the_same_seed_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = (random_init_backbone(SMALL, s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
    boxes = [(8, 8, 40, 40), (20, 10, 60, 50)] * 12
    data = _set(images, boxes, np.repeat(np.arange(12), 2), [1, 2] * 12, image_labels=[1, 2] * 6)
    tr, te = data.subset(range(8)), data.subset(range(8, 12))
    runs = [run_probes({"random": random_init_backbone(SMALL, 0)}, tr, te, ["res5"], k=3) for _ in range(2)]
    assert runs[0]["results"] == runs[1]["results"] and len(runs[0]["results"]) == 4   # 2 scopes x 2 probes
