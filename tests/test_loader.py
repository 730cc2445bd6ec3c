"""Loader tests: geometric exactness of every recipe on both backends, DALI vs reference
distributions, rank x worker splitting, resume, and bad shards. Synthetic shards with
objects of known colours (train/loader/synthetic.py) are the pixel oracle; the real
built-in sample (`sample_shards`) checks the batch contract on real shards."""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from loader_checks import (box_frames_object, classify, expected_labels, interior, margin_for)
from train.loader import ShardReadError, build_loader, geometry as G
from train.loader.source import ShardSource, decode_png
from train.loader.split import Split, worker_batches
from train.loader.synthetic import write_shards

RECIPES = ["soco", "soco_star", "soco_c4", "detcon", "maskco", "mocov2"]
BACKENDS = ["dali", "reference"]
N_SYN = 16
BATCH = 4


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def syn_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("syn") / "shards", N_SYN, per_shard=4, seed=3)


@pytest.fixture(scope="session")
def syn_labels(syn_shards):
    src = ShardSource(syn_shards)
    return [decode_png(src.data.read_members(src.data.row(i), ["fh.png"])["fh.png"], k)
            for i, k in enumerate(src.keys)]


def exact_loader(recipe, shards, backend, **kw):
    """Colour augmentation and box jitter off: what remains is pure geometry."""
    if recipe.startswith("soco"):
        kw.setdefault("jitter_prob", 0.0)
    return build_loader(recipe, shards, BATCH, backend=backend, num_workers=0, colour=False, **kw)


def box_view(key: str) -> str:
    return "view1" if key.startswith("boxes1_") else "view" + key[len("boxes"):]


@pytest.mark.parametrize("backend", BACKENDS + ["dali:decode=dali", "dali:image_size=40"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_views_boxes_and_masks_match_their_pixels(recipe, backend, syn_shards, syn_labels):
    """On CPU the DALI backend decodes in its feeder (reduced-size IDCT when every view
    shrinks >= 2x: exercised by SoCo's 40 px views); `dali:decode=dali` runs DALI's own
    decoder, the graph GPUs use."""
    backend, _, option = backend.partition(":")
    kw = {k: (int(v) if v.isdigit() else v) for k, v in [option.split("=")]} if option else {}
    loader = exact_loader(recipe, syn_shards, backend, **kw)
    names = [s.name for s in loader.recipe.views]
    checked_boxes = 0
    for batch in itertools.islice(loader, 2):  # 8 samples: every image size twice
        for i in range(BATCH):
            src = syn_labels[int(batch["index"][i])]
            classes = {}
            for v, name in enumerate(names):  # every view shows the crop its parameters say
                p, size = batch["views"][i, v], batch[name].shape[-1]
                classes[name] = classify(batch[name][i])
                want = expected_labels(src, p, size)
                ok = interior(want, margin_for(p, size))
                if "query_box" in batch and name == "query":  # MaskCo's zeroed box is checked in its own test
                    qb, m = batch["query_box"][i].numpy(), margin_for(p, size)
                    ys, xs = np.mgrid[0:size, 0:size] + 0.5
                    ok &= ~((xs > qb[0] - m) & (xs < qb[2] + m) & (ys > qb[1] - m) & (ys < qb[3] + m))
                assert not ok.any() or (classes[name][ok] == want[ok]).mean() > 0.99, (name, p)
            for key in [k for k in batch if k.startswith("boxes")]:
                view = box_view(key)
                p = batch["views"][i, names.index(view)]
                ids = batch["ids" + key[len("boxes"):]][i]
                assert batch["valid" + key[len("boxes"):]][i].all()  # SoCo pads by resampling
                for j, obj in enumerate(ids.tolist()):
                    if obj >= src.max():  # the whole-view fallback frames no object
                        continue
                    why = box_frames_object(classes[view], batch[key][i, j].numpy(), obj + 1,
                                            margin_for(p, batch[view].shape[-1]))
                    assert why is None, f"{key}[{i},{j}]: {why}"
                    checked_boxes += 1
            for mask_key, view in loader.recipe.mask_views.items():
                p = batch["views"][i, names.index(view)]
                mask = batch[mask_key][i].numpy()
                ok = interior(mask, margin_for(p, mask.shape[-1])) & (classes[view] >= 0)
                assert not ok.any() or (mask[ok] == classes[view][ok]).mean() > 0.99
    if recipe.startswith("soco"):   # 2 batches x K = 4 boxes per box set: at least half framed
        assert checked_boxes > 2 * BATCH * 2 * len(loader.recipe.box_sets)
    if "image_size" in kw and recipe.startswith("soco"):  # so the reduced decode ran
        views = loader.recipe.views[:3]
        rel = torch.tensor([v.size / views[0].size for v in views])
        shrink = batch["views"][:, :len(views), 2:4] / rel[:, None] / kw["image_size"]
        assert (shrink.amin((1, 2)) >= 2).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["mcg", "gt", "grid"])
def test_detcon_mask_sources(source, backend, syn_shards, syn_labels):
    """mcg: each pixel takes the best-ranked (lowest bit) mask: objects keep their own
    bit (id = bit + 1) over the whole-image mask (bit 15, id 16); gt: instance ids;
    grid: a 5x5 grid over the source image moves with the crop."""
    loader = exact_loader("detcon", syn_shards, backend, mask_source=source)
    batch = next(iter(loader))
    for i in range(BATCH):
        src = syn_labels[int(batch["index"][i])]
        for v, (mask_key, view) in enumerate(loader.recipe.mask_views.items()):
            p, mask = batch["views"][i, v], batch[mask_key][i].numpy()
            if source == "mcg":
                want = expected_labels(np.where(src > 0, src, 16), p, 224)
            elif source == "gt":
                want = expected_labels(src, p, 224)
            else:
                want = expected_labels(G.grid_labels(*src.shape, 5, 5), p, 224)
            ok = interior(want, 1)
            assert (mask[ok] == want[ok]).mean() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_maskco_boxes_and_masked_query(backend, syn_shards):
    loader = build_loader("maskco", syn_shards, BATCH, backend=backend, num_workers=0)
    for batch in loader:
        kb, qb = batch["key_boxes"], batch["query_box"]
        assert kb.shape == (BATCH, 17, 4) and qb.shape == (BATCH, 4)
        side = torch.stack([kb[..., 2] - kb[..., 0], kb[..., 3] - kb[..., 1]], -1)
        assert side.min() >= 32 - 1e-3 and side.max() <= 128 + 1e-3
        assert kb.min() >= 0 and kb.max() <= 224
        for i in range(BATCH):
            assert G.iou(kb[i, 0].numpy(), kb[i, 1:].numpy()).max() < 0.2
            # box 0 and the query box are the same source region (views hold the crops)
            views = [G.View(*p[:4].tolist(), 224, 224, bool(p[4])) for p in batch["views"][i]]
            q_src = G.to_source(qb[i].numpy(), views[0])[0]
            k_src = G.to_source(kb[i, 0].numpy(), views[1])[0]
            np.testing.assert_allclose(q_src, k_src, atol=1e-2)
            x1, y1, x2, y2 = qb[i].tolist()
            inside = batch["query"][i, :, int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)]
            assert inside.numel() > 0 and inside.abs().max() == 0
            assert batch["query"][i].abs().sum() > inside.abs().sum()


def test_dali_and_reference_agree_in_distribution(syn_shards):
    """Crop scale and aspect ratio (DetCon's 0.08..1, the widest range), flip rate, and how
    many distinct proposals SoCo keeps, over the same epochs from both backends (their
    crop samplers are independent: geometry.rrc vs torchvision's RandomResizedCrop)."""
    src = ShardSource(syn_shards)
    stats = {}
    for backend in BACKENDS:
        crops, areas, kept = [], [], []
        for recipe, epochs in (("detcon", 4), ("soco", 2)):
            loader = exact_loader(recipe, syn_shards, backend, seed=11)
            for epoch in range(epochs):
                loader.set_epoch(epoch)
                for batch in loader:
                    if recipe == "detcon":
                        crops.append(batch["views"].reshape(-1, 5))
                        for i in batch["index"].tolist():
                            raw = src.load(i)
                            areas += [raw.width * raw.height] * 2
                    else:
                        kept += [len(set(row.tolist())) for row in batch["ids2"]]
        c = torch.cat(crops).numpy()
        stats[backend] = dict(scale=c[:, 2] * c[:, 3] / np.array(areas), aspect=np.log(c[:, 2] / c[:, 3]),
                              flip=c[:, 4], kept=np.array(kept))
    d, r = stats["dali"], stats["reference"]
    assert len(d["flip"]) == len(r["flip"]) == 4 * N_SYN * 2
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(d["scale"], q) - np.quantile(r["scale"], q)) < 0.1
    assert 0.08 * 0.9 < d["scale"].min() and d["scale"].max() <= 1.0
    assert abs(d["aspect"].mean() - r["aspect"].mean()) < 0.06
    assert abs(d["aspect"].std() - r["aspect"].std()) < 0.04
    assert abs(d["flip"].mean() - r["flip"].mean()) < 0.12
    assert abs(d["kept"].mean() - r["kept"].mean()) < 0.4


# ---------------------------------------------------------------- splitting and resume
def test_split_covers_every_sample_once_across_2_ranks_x_2_workers():
    n, batch = 37, 4  # 37 does not fill the last round: wrapped copies pad it
    for epoch in (0, 1):
        seen, steps = [], set()
        for rank in range(2):
            split = Split(n, batch, world_size=2, rank=rank, seed=5)
            steps.add(split.steps)
            batches = split.batches(epoch)
            assert len(batches) == split.steps
            per_worker = [worker_batches(batches, 2, w) for w in range(2)]
            assert sorted(sum(([s.tolist() for s, _ in wb] for wb in per_worker), [])) == \
                sorted(s.tolist() for s, _ in batches)
            for wb in per_worker:
                for samples, slots in wb:
                    seen += [int(x) for x, slot in zip(samples, slots) if slot < n]
        assert steps == {5}  # ceil(37 / 8) on both ranks
        assert sorted(seen) == list(range(n))
    a, b = Split(n, batch, 2, 0, seed=5), Split(n, batch, 2, 0, seed=6)
    assert not np.array_equal(a.order(0), a.order(1)) and not np.array_equal(a.order(0), b.order(0))


def test_loader_ranks_and_workers_cover_the_shards(syn_shards):
    """Two ranks x two workers through the real loaders: DALI with 2 threads and the
    reference with 2 DataLoader processes return the split's batches in order."""
    seen = []
    for rank in range(2):
        expected = [s.tolist() for s, _ in Split(N_SYN, 3, 2, rank, seed=1).batches(0)]
        for backend in BACKENDS:
            loader = build_loader("mocov2", syn_shards, 3, rank=rank, world_size=2, num_workers=2,
                                  seed=1, backend=backend, colour=False, image_size=32)
            got = [b["index"].tolist() for b in loader]
            assert len(got) == len(loader) == 3 and got == expected
        seen += sum(got, [])
    assert set(seen) == set(range(N_SYN)) and len(seen) == 18  # 2 wrapped copies pad the round


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_same_remaining_batches(backend, syn_shards):
    kw = dict(backend=backend, num_workers=0, seed=2, image_size=64)
    full = build_loader("soco", syn_shards, BATCH, **kw)
    full.set_epoch(1)
    reference = list(full)
    partial = build_loader("soco", syn_shards, BATCH, **kw)
    partial.set_epoch(1)
    it = iter(partial)
    next(it), next(it)
    state = partial.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = build_loader("soco", syn_shards, BATCH, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's per-epoch call must keep the loaded position
    rest = list(resumed)
    assert len(rest) == len(reference) - 2
    for got, want in zip(rest, reference[2:]):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert resumed.state_dict()["epoch"] == 2
    other = build_loader("soco", syn_shards, BATCH + 1, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- bad shards
def test_truncated_shard_is_named_with_the_fix(syn_shards, tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(syn_shards, bad)
    victim = sorted(bad.glob("*.tar"))[2]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ShardReadError, match=f"{victim}.*truncated.*make shards"):
        build_loader("soco", bad, BATCH, backend="reference")


def test_a_folder_without_shards_and_a_missing_member_are_named(tmp_path):
    from train.loader.synthetic import draw_image, jpeg, pack
    with pytest.raises(ShardReadError, match=r"manifest\.json not found.*make shards"):
        build_loader("mocov2", tmp_path / "empty", BATCH)
    rgb, labels, rects = draw_image(np.random.default_rng(0), 96, 64, 2)
    shards = pack(tmp_path / "nogt", [("nogt", jpeg(rgb), labels, rects)], gt=False)
    loader = build_loader("detcon", shards, 1, backend="reference", num_workers=0, mask_source="gt")
    with pytest.raises(ShardReadError, match=r"nogt\.gt\.png is missing.*mask source"):
        next(iter(loader))


def test_unknown_recipe_parameter_is_refused(syn_shards):
    with pytest.raises(ValueError, match="no parameters.*jiter_prob"):
        build_loader("soco", syn_shards, BATCH, jiter_prob=0.2)
    with pytest.raises(ValueError, match="mask_source"):
        build_loader("detcon", syn_shards, BATCH, mask_source="slic")


# ---------------------------------------------------------------- geometry
def test_mcg_bitfield_takes_the_lowest_set_bit():
    bits = np.array([[0, 1, 2, 3], [6, 1 << 15, (1 << 15) | 4, 0xFFFF]], np.uint16)
    assert G.mcg_labels(bits).tolist() == [[0, 1, 2, 1], [2, 16, 3, 1]]


def test_box_round_trip_and_flip():
    view = G.View(10, 20, 40, 80, 20, 40, True)
    boxes = np.array([[15, 30, 25, 50], [0, 0, 100, 100]], np.float32)
    out = G.to_view(boxes, view)
    # 15..25 -> 2.5..7.5 in view x, mirrored in a 20 px view -> 12.5..17.5; the second is clipped
    np.testing.assert_allclose(out, [[12.5, 5, 17.5, 15], [0, 0, 20, 40]])
    np.testing.assert_allclose(G.to_source(out[:1], view), boxes[:1], atol=1e-5)


def test_soco_jitter_moves_half_the_boxes_by_at_most_ten_percent():
    rng = np.random.default_rng(0)
    boxes = np.tile(np.array([[100, 100, 200, 150]], np.float32), (4000, 1))
    out = G.jitter(rng, boxes, 0.5, 0.1)
    moved = np.any(out != boxes, axis=1)
    assert 0.45 < moved.mean() < 0.55
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    assert np.abs(out[:, 0] - 100).max() <= 10 + 1e-4 and np.abs(out[:, 1] - 100).max() <= 5 + 1e-4
    assert 90 - 1e-4 <= w.min() and w.max() <= 110 + 1e-4 and 45 - 1e-4 <= h.min() <= h.max() <= 55 + 1e-4


def test_soco_selection_uses_only_boxes_overlapping_the_intersection():
    from train.loader.recipes import NumpyDraw, Recipe
    recipe = Recipe("soco", jitter_prob=0.0)
    boxes = np.array([[0, 0, 10, 10], [150, 110, 160, 120], [60, 40, 100, 80]], np.float32)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        plan = recipe.plan(160, 120, boxes, NumpyDraw(rng), rng)
        for tag in ("2", "3"):
            view = plan.views[f"view{tag}"]
            ids = plan.ids[f"ids{tag}"]
            assert len(ids) == 4 and (ids == plan.ids[f"ids1_{tag}"]).all()
            real = ids[ids < len(boxes)]
            assert G.overlapping(boxes[real], view.rect).all()
            if len(real) < len(ids):  # only the whole-view fallback may replace proposals
                assert (ids == len(boxes)).all() and not G.overlapping(boxes, view.rect).any()


# ---------------------------------------------------------------- colour
def test_colour_parameters_follow_byol_and_moco_probabilities():
    from train.loader.dali_pipeline import draw_colour
    rng = np.random.default_rng(0)
    for scheme, p_blur, p_sol in (("byol1", 1.0, 0.0), ("byol2", 0.1, 0.2), ("moco", 0.5, 0.0)):
        draws = [draw_colour(rng, scheme, True) for _ in range(4000)]
        twist = np.stack([d[0] for d in draws])
        jittered = (twist[:, 0] != 1) | (twist[:, 3] != 0)
        assert abs(jittered.mean() - 0.8) < 0.03
        assert abs((twist[:, 2] == 0).mean() - 0.2) < 0.03  # grayscale
        assert abs(np.mean([d[1] > 0 for d in draws]) - p_blur) < 0.03
        assert abs(np.mean([bool(d[2]) for d in draws]) - p_sol) < 0.03
        assert np.abs(twist[jittered, 3]).max() <= 36.0 + 1e-4  # hue 0.1 of a turn, in degrees
    off = draw_colour(rng, "byol1", False)
    assert off[0].tolist() == [1, 1, 1, 0] and off[1] == 0 and not off[2]


def test_a_named_colour_scheme_replaces_every_views_own_and_a_wrong_name_is_refused():
    from train.loader.dali_pipeline import draw_colour
    from train.loader.recipes import Recipe
    assert {v.colour for v in Recipe("soco").views} == {"byol1", "byol2"}
    assert {v.colour for v in Recipe("soco", colour="strong").views} == {"strong"}
    rng = np.random.default_rng(0)
    twist = np.stack([draw_colour(rng, "strong", True)[0] for _ in range(4000)])
    assert abs((twist[:, 2] == 0).mean() - 0.5) < 0.03              # grey half the time
    assert np.abs(twist[:, 3]).max() > 150                             # any hue (0.5 of a turn)
    with pytest.raises(ValueError, match="colour 'loud' is not a colour scheme.*strong"):
        Recipe("mocov2", colour="loud")


def test_dali_colour_ops_change_pixels_as_drawn(syn_shards):
    """With colour on, about a fifth of the views come out grey (R = G = B)."""
    loader = build_loader("soco", syn_shards, BATCH, backend="dali", seed=4)
    grey = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            for name in ("view1", "view2", "view3"):
                x = batch[name] * torch.tensor([0.229, 0.224, 0.225])[:, None, None] \
                    + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
                grey += ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 3 / 255).tolist()
    assert len(grey) == 96 and 0.08 < np.mean(grey) < 0.35


def test_separable_blur_equals_dali_gaussian_blur():
    """Our blur (two fn.filter passes with the feeder's taps) gives fn.gaussian_blur's pixels
    for every sigma BYOL draws, per sample in one batch, and sigma 0 leaves pixels alone."""
    from nvidia.dali import fn, pipeline_def
    from train.loader.dali_pipeline import gaussian_taps, separable_blur
    rng = np.random.default_rng(0)
    sigmas = [0.1, 0.35, 0.8, 1.0, 1.45, 2.0]
    images = [rng.uniform(-20, 280, (40 + 7 * i, 57 - 3 * i, 3)).astype(np.float32)
              for i in range(len(sigmas))]

    @pipeline_def(batch_size=len(sigmas), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        s = fn.external_source(source=lambda: [np.float32(v) for v in sigmas], batch=True)
        taps = fn.external_source(source=lambda: [gaussian_taps(v) for v in sigmas], batch=True)
        return fn.gaussian_blur(x, sigma=s), separable_blur(x, taps)

    p = pipe()
    p.build()
    want, got = p.run()
    for i, sigma in enumerate(sigmas):
        assert len(gaussian_taps(sigma)) == 2 * int(np.ceil(3 * sigma)) + 1
        np.testing.assert_allclose(np.array(got[i]), np.array(want[i]), atol=2e-3)
        if sigma > 0.3:  # sigma 0.1 is the identity to float precision, in both
            assert np.abs(np.array(got[i]) - images[i]).max() > 1
    assert gaussian_taps(0.0).tolist() == [1.0]


# ---------------------------------------------------------------- real shards
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_recipe_on_the_built_in_sample_shards(backend, sample_shards):
    """The batch contract of docs/interfaces.md on shards written by shards/ (real
    proposals, FH and MCG-style maps, GT), colour augmentation on."""
    source = ShardSource(sample_shards)
    for recipe in RECIPES + ["detcon:mcg", "detcon:gt"]:
        name, _, mask_source = recipe.partition(":")
        kw = {"mask_source": mask_source} if mask_source else {}
        loader = build_loader(name, sample_shards, 2, backend=backend, num_workers=0, **kw)
        assert len(loader) == -(-len(source) // 2)
        batch = next(iter(loader))
        for view in loader.recipe.views:
            x = batch[view.name]
            assert x.dtype == torch.float32 and x.shape == (2, 3, view.size, view.size)
            assert torch.isfinite(x).all() and x.std() > 0.05
        for key in [k for k in batch if k.startswith("boxes")]:
            boxes, ids = batch[key], batch["ids" + key[len("boxes"):]]
            size = batch[box_view(key)].shape[-1]
            assert boxes.shape == (2, 4, 4) and ids.dtype == torch.int64
            assert boxes.min() >= 0 and boxes.max() <= size
            for i, idx in enumerate(batch["index"].tolist()):
                assert ids[i].max() <= len(source.load(idx).boxes)  # == N: whole-view fallback
        for mask_key in loader.recipe.mask_views:
            assert batch[mask_key].dtype == torch.int64 and batch[mask_key].shape == (2, 224, 224)
            assert batch[mask_key].min() >= 0


def test_a_grey_jpeg_is_stored_as_rgb_and_a_broken_jpeg_fails_packing_naming_its_key(tmp_path):
    """A single-channel JPEG (as some COCO images are) is re-encoded as RGB by the writer,
    so views are 3-channel; a JPEG that does not decode is a failed row naming its key,
    never a shard member."""
    import io

    from PIL import Image

    from shards.reader import ShardDataset
    from train.loader.synthetic import draw_image, pack
    rng = np.random.default_rng(0)
    images = []
    for key in ("grey", "broken"):
        rgb, labels, rects = draw_image(rng, 96, 64, 2)
        buf = io.BytesIO()
        Image.fromarray(rgb[:, :, 0]).save(buf, "JPEG", quality=90)
        images.append((key, buf.getvalue() if key == "grey" else b"\xff\xd8not a jpeg", labels, rects))
    pack(tmp_path / "shards", images)
    data = ShardDataset(tmp_path / "shards")
    assert data.keys == ["grey"] and "broken" in data.failed and "broken" in data.failed["broken"]
    for backend in BACKENDS:
        batch = next(iter(build_loader("mocov2", tmp_path / "shards", 1, backend=backend,
                                       num_workers=0)))
        assert batch["query"].shape == (1, 3, 224, 224)


@pytest.mark.parametrize("decode_here", [False, True])
def test_gpu_graph_is_well_formed_without_a_gpu(decode_here, syn_shards):
    """The GPU branches (mixed decode or fed pixels moved with .gpu(), GPU ops, label maps
    on GPU) define a valid DALI graph; running it needs CUDA, which this machine lacks."""
    from train.loader import dali_pipeline as D
    from train.loader.recipes import Recipe
    source = ShardSource(syn_shards)
    for name in ("soco_star", "detcon"):
        recipe = Recipe(name)
        feeder = D.Feeder(recipe, source, Split(len(source), 2).batches(0), 0, 0, decode_here)
        pipe = D.build_pipeline(recipe, feeder, 2, 1, device_id=0)
        pipe._build_graph()  # the op graph in Python (no CUDA needed); fails on mis-wiring
        if torch.cuda.is_available():  # where a GPU exists, run it too
            pipe.build()
            assert len(pipe.run()) == len(recipe.views) + len(recipe.mask_views)
