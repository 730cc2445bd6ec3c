"""MoCo v2: the key queue (order, wrap-around, checkpointing), the InfoNCE loss against
a direct computation, and one method step (random-weight tiny ResNet-18)."""
from __future__ import annotations

import collections
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.test_detcon import run_ranks
from train.methods import get
from train.methods.mocov2 import KeyQueue, infonce, shuffle_across_ranks, shuffle_bn_mode, unshuffle_across_ranks

torch.set_num_threads(1)


def _keys(start: int, n: int, dim: int = 3) -> torch.Tensor:
    """Distinct, recognisable keys: row i is (start+i) in every coordinate."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


@pytest.mark.parametrize("size,batches", [(5, [2, 2, 2, 3]), (4, [2, 2, 2]), (3, [7]), (6, [1, 5, 4, 6])])
def test_queue_keeps_newest_keys_in_fifo_order_with_wrap_around(size, batches):
    queue = KeyQueue(dim=3, size=size)
    initial = queue.keys.clone()
    model = collections.deque(initial, maxlen=size)     # the FIFO it must behave like
    seen = 0
    for n in batches:
        batch = _keys(100 + seen, n)
        seen += n
        queue.enqueue(batch)
        model.extend(batch)
        assert torch.equal(queue.oldest_first(), torch.stack(list(model)))
        assert int(queue.ptr) == seen % size
    # the next slot to be overwritten holds the oldest key
    assert torch.equal(queue.keys[int(queue.ptr)], queue.oldest_first()[0])


def test_queue_wraps_a_batch_across_the_end():
    queue = KeyQueue(dim=3, size=5)
    queue.enqueue(_keys(0, 4))          # slots 0..3
    queue.enqueue(_keys(4, 3))          # slot 4, then 0 and 1
    assert queue.keys[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert int(queue.ptr) == 2
    assert queue.oldest_first()[:, 0].tolist() == [2, 3, 4, 5, 6]


def test_queue_state_survives_a_checkpoint():
    a = KeyQueue(dim=3, size=5)
    a.enqueue(_keys(0, 3))
    b = KeyQueue(dim=3, size=5)
    b.load_state_dict(a.state_dict())
    a.enqueue(_keys(3, 4))
    b.enqueue(_keys(3, 4))
    assert torch.equal(a.keys, b.keys) and int(a.ptr) == int(b.ptr) == 2
    with pytest.raises(ValueError, match="queue size"):
        KeyQueue(dim=3, size=0)


def test_infonce_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    neg = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    loss, acc = infonce(q, k, neg, temperature=0.2)
    want, hits = 0.0, 0
    for n in range(3):
        logits = [float(q[n] @ k[n]) / 0.2] + [float(q[n] @ neg[j]) / 0.2 for j in range(5)]
        want += -(logits[0] - math.log(sum(math.exp(x) for x in logits))) / 3
        hits += logits[0] == max(logits)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == pytest.approx(hits / 3)


def _tiny(queue_size=8):
    cfg = {"model": {"backbone": "resnet18", "width": 8, "queue_size": queue_size, "dim": 16}}
    return get("mocov2").build(cfg)    # random weights


def test_mocov2_step_uses_old_queue_then_enqueues_this_batchs_keys():
    torch.manual_seed(0)
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    batch = {"query": torch.randn(4, 3, 32, 32, generator=g), "key": torch.randn(4, 3, 32, 32, generator=g)}
    old_queue = model.queue.keys.clone()
    out = model(batch)
    with torch.no_grad():
        q = F.normalize(model.head(model.backbone(batch["query"])), dim=1)
        k = F.normalize(model.key_head(model.key_backbone(batch["key"])), dim=1)
    want, _ = infonce(q, k, old_queue, 0.2)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(model.queue.oldest_first()[-4:], k, atol=1e-6)    # newest four = this batch
    out["loss"].backward()
    assert all(p.grad is None for p in model.key_backbone.parameters())      # keys carry no gradient
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_mocov2_momentum_update_is_constant_ema():
    model = _tiny()
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    before_k = model.key_backbone.conv1.weight.clone()
    online = model.backbone.conv1.weight.clone()
    model.momentum_update(step=5, total_steps=10)
    assert torch.allclose(model.key_backbone.conv1.weight, 0.999 * before_k + 0.001 * online)
    groups = model.param_groups(1e-4)
    assert model.optimizer == "sgd" and len(groups) == 1 and groups[0]["weight_decay"] == 1e-4
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) == n_trainable          # MoCo decays biases and BN too


def test_mocov2_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown mocov2 model keys"):
        get("mocov2").build({"model": {"queue": 5}})


def _shuffle_worker(rank, world, init_file, out_dir):
    """One gloo rank: shuffle its rows across ranks, apply a per-row 'key encoder', unshuffle."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)                           # ranks draw differently: rank 0's permutation must win
        x = torch.arange(4, dtype=torch.float32)[:, None] + 10 * rank + torch.zeros(4, 3)
        shuffled, inverse = shuffle_across_ranks(x)
        keys = unshuffle_across_ranks(2 * shuffled + 1, inverse)
        torch.save(dict(x=x, shuffled=shuffled, inverse=inverse, keys=keys,
                        auto=shuffle_bn_mode("auto", torch.device("cpu")), forced=shuffle_bn_mode(True, x.device)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shuffled_bn_permutes_the_global_batch_and_restores_each_ranks_order(tmp_path):
    world = 2
    run_ranks(_shuffle_worker, world, str(tmp_path / "init"), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    everything = torch.cat([g["x"] for g in got])
    assert torch.equal(got[0]["inverse"], got[1]["inverse"])                  # one permutation for all
    shuffled = torch.cat([g["shuffled"] for g in got])
    assert sorted(shuffled[:, 0].tolist()) == sorted(everything[:, 0].tolist())   # a permutation
    assert torch.equal(shuffled[got[0]["inverse"]], everything)
    for g in got:
        assert torch.equal(g["keys"], 2 * g["x"] + 1)                           # back in the rank's own order
        assert g["auto"] is False and g["forced"] is True                      # auto: CUDA only
