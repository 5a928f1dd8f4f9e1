"""VectorQuantizer's family options, each against an independent reference."""

import contextlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastvq
from fastvq import VectorQuantizer
from fastvq.quantizers.kmeans import kmeans, kmeans_plusplus
from fastvq.testing import assert_contract, distances_fp64

# The VQ-VAE paper's choices, for tests about something else than the (peer's) EMA default.
GRADIENT = dict(ema_update=False, learnable_codebook=True, codebook_weight=1.0, rotation_trick=False)


def _clusters(num, per, dim, spread=0.05, scale=10.0):
    centers = scale * torch.randn(num, dim)
    return centers, (centers[:, None, :] + spread * torch.randn(num, per, dim)).reshape(-1, dim)


def test_ema_with_decay_zero_is_one_lloyd_step_on_used_codes():
    vq = VectorQuantizer(dim=3, codebook_size=9, ema_update=True, decay=0.0, eps=1e-12, backend="torch")
    before = vq.embed.detach().clone()
    z = torch.randn(200, 3)
    vq.train()
    _, idx, _ = vq(z)
    assign = distances_fp64(z, before).argmin(1)  # independent assignment, fp64
    assert torch.equal(idx, assign)
    for k in assign.unique().tolist():
        torch.testing.assert_close(vq.embed[k].double(), z[assign == k].double().mean(0), rtol=1e-5, atol=1e-6)


def test_ema_two_steps_follow_the_formula():
    decay, eps = 0.5, 1e-3
    vq = VectorQuantizer(dim=2, codebook_size=4, ema_update=True, decay=decay, eps=eps, backend="torch")
    count = torch.ones(4, dtype=torch.float64)
    total = vq.embed.detach().double().clone()
    vq.train()
    for _ in range(2):
        z = torch.randn(50, 2)
        assign = distances_fp64(z, vq.embed).argmin(1)
        n = torch.bincount(assign, minlength=4).double()
        s = torch.zeros(4, 2, dtype=torch.float64).index_add_(0, assign, z.double())
        count = decay * count + (1 - decay) * n
        total = decay * total + (1 - decay) * s
        smoothed = (count + eps) / (count.sum() + 4 * eps) * count.sum()
        vq(z)
        torch.testing.assert_close(vq.embed.double(), total / smoothed[:, None], rtol=1e-5, atol=1e-6)
    assert vq._codebook.embed.grad is None and not vq._codebook.embed.requires_grad


def test_ema_statistics_stay_fp32_when_the_module_is_cast():
    vq = VectorQuantizer(dim=4, codebook_size=8, ema_update=True, decay=0.9, backend="torch").to(torch.bfloat16)
    assert vq.embed.dtype == torch.bfloat16
    assert vq._codebook.cluster_size.dtype == vq._codebook.embed_avg.dtype == torch.float32
    vq.train()
    z = vq.embed.detach()[[3] * 400].float().to(torch.bfloat16)  # 400 rows on code 3 every step
    for _ in range(50):
        vq(z)
    # count -> 400 geometrically: 400 - 399 * 0.9^50 = 397.9; a bf16 count would stall at 256-ish
    assert vq._codebook.cluster_size[0, 3].item() == pytest.approx(400 - 399 * 0.9**50, rel=1e-4)


def test_codebook_weight_with_ema_is_rejected():
    with pytest.raises(ValueError, match="codebook_weight must be 0"):
        VectorQuantizer(dim=4, codebook_size=8, ema_update=True, codebook_weight=1.0)
    assert VectorQuantizer(dim=4, codebook_size=8, ema_update=True).codebook_weight == 0.0


def test_ema_loss_has_no_codebook_term():
    vq = VectorQuantizer(dim=4, codebook_size=8, ema_update=True, commitment_weight=0.5, backend="torch")
    vq.eval()
    z = torch.randn(30, 4)
    _, idx, loss = vq(z)
    assert loss.shape == () and loss.item() == 0.0  # the peer's: no loss in eval mode
    vq.eval_loss = True
    _, idx, loss = vq(z)
    expected = 0.5 * ((z.double() - vq.embed.double()[idx]) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected)


def test_kmeans_plusplus_seeds_every_well_separated_cluster():
    centers, data = _clusters(12, 40, 5)
    seeds = kmeans_plusplus(data, 12, generator=torch.Generator().manual_seed(3))
    # one seed near each cluster: the nearest center of the seeds covers all 12
    assert torch.cdist(seeds, centers).argmin(1).unique().numel() == 12


def test_kmeans_converges_to_the_cluster_centers():
    centers, data = _clusters(8, 50, 4)
    centroids, counts = kmeans(data, 8, iters=10, backend="torch")
    err = torch.cdist(centers, centroids).min(1).values
    assert err.max() < 0.05 and counts.sum() == data.shape[0]


def test_kmeans_init_on_first_training_batch_only():
    centers, data = _clusters(6, 30, 3)
    vq = VectorQuantizer(dim=3, codebook_size=6, kmeans_init=True, **GRADIENT, backend="torch")
    vq.eval()
    vq(data)
    assert not vq._codebook._initted  # eval forwards do not initialise
    vq.train()
    vq(data)
    assert vq._codebook._initted and bool(vq._codebook.initted)
    assert torch.cdist(centers, vq.embed.detach()).min(1).values.max() < 0.2
    snapshot = vq.embed.detach().clone()
    vq(data + 100)  # no second init (and no optimizer step: a gradient codebook stays put)
    assert torch.equal(snapshot, vq.embed.detach())


def test_dead_codes_come_back():
    vq = VectorQuantizer(dim=2, codebook_size=16, threshold_ema_dead_code=0.5, decay=0.5, **GRADIENT, backend="torch")
    with torch.no_grad():
        vq.embed.copy_(torch.randn(16, 2) + 1000.0)  # all codes far away from the data
        vq.embed[0] = 0.0  # only code 0 is ever chosen
    vq.train()
    data = torch.randn(256, 2)
    vq(data)  # usage EMA of the unused codes: 1 -> 0.5, not yet below the threshold
    assert vq.dead_codes.item() == 0
    vq(data)  # 0.5 -> 0.25: the 15 unused codes are revived
    assert vq.dead_codes.item() == 15
    # every code now sits on a data point, the far-away ones are gone
    assert vq.embed.detach().abs().max() < 10
    on_data = (vq.embed.detach()[1:, None, :] - data[None]).abs().amax(-1).amin(1)  # exact, no cdist
    assert on_data.max() == 0


def test_dead_code_telemetry_counts_unused_codes():
    vq = VectorQuantizer(dim=2, codebook_size=8, decay=0.0, backend="torch")
    vq.train()
    z = vq.embed.detach()[[1, 1, 2]] + 1e-4
    vq(z)
    assert vq.dead_codes.item() == 6
    assert vq.codes_used_fraction.item() == pytest.approx(2 / 8)


def test_cosine_similarity_matches_the_cosine_metric():
    vq = VectorQuantizer(dim=5, codebook_size=13, use_cosine_sim=True, backend="torch").eval()
    z = 3 * torch.randn(40, 5)
    q, idx, _ = vq(z)
    ref_idx, _ = fastvq.nearest_code(z, vq.embed, metric="cosine", backend="torch")
    assert_contract(idx, z, vq.embed, metric="cosine")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(40))
    torch.testing.assert_close(q, F.normalize(vq.embed, dim=-1)[idx])


@pytest.mark.parametrize("separate", [False, True])
def test_heads(separate):
    vq = VectorQuantizer(dim=12, codebook_size=7, codebook_dim=4, heads=3, separate_codebook_per_head=separate,
                         commitment_weight=0.25, **GRADIENT, backend="torch")
    z = torch.randn(2, 5, 12)
    q, idx, loss = vq(z)
    assert q.shape == z.shape and idx.shape == (2, 5, 3)
    parts = z.view(2, 5, 3, 4)
    for h in range(3):
        book = vq.embed[h] if separate else vq.embed
        expected, _ = fastvq.nearest_code(parts[..., h, :], book, backend="torch")
        assert torch.equal(idx[..., h], expected)
    assert torch.equal(vq.get_output_from_indices(idx), q)
    books = vq.embed.detach() if separate else vq.embed.detach().expand(3, 7, 4)
    chosen = torch.stack([books[h][idx[..., h]] for h in range(3)], dim=-2)
    expected_loss = 1.25 * ((parts.double() - chosen.double()) ** 2).mean()
    torch.testing.assert_close(loss.double(), expected_loss)


def test_rotation_trick_forward_is_the_code_and_backward_rotates():
    vq = VectorQuantizer(dim=4, codebook_size=5, rotation_trick=True, commitment_weight=0.0, codebook_weight=0.0,
                         ema_update=False, learnable_codebook=True, backend="torch")
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    vq = vq.double()
    q, idx, _ = vq(z)
    e = vq.embed.detach()[idx]
    assert torch.equal(q, e)  # bitwise
    g = torch.randn(6, 4, dtype=torch.float64)
    (gz,) = torch.autograd.grad(q, z, g)
    for i in range(6):  # explicit matrices: R maps z^ to e^, gradient is (||e||/||z||) R^T g
        zi, ei = z[i].detach(), e[i]
        u, w = zi / zi.norm(), ei / ei.norm()
        r = (u + w) / (u + w).norm()
        rot = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(w, u)
        torch.testing.assert_close(rot @ u, w)
        torch.testing.assert_close(gz[i], (ei.norm() / zi.norm()) * rot.t() @ g[i])


def test_state_dict_round_trip_with_ema_buffers():
    a = VectorQuantizer(dim=3, codebook_size=5, ema_update=True, kmeans_init=True, backend="torch")
    a.train()
    a(torch.randn(40, 3))
    b = VectorQuantizer(dim=3, codebook_size=5, ema_update=True, kmeans_init=True, backend="torch")
    b.load_state_dict(a.state_dict())
    assert b._codebook._initted
    assert sorted(a.state_dict()) == [f"_codebook.{k}" for k in ("cluster_size", "embed", "embed_avg", "initted")]
    for name in ("embed", "cluster_size", "embed_avg", "initted"):
        assert torch.equal(getattr(a._codebook, name), getattr(b._codebook, name)), name
    z = torch.randn(20, 3)
    a(z)
    b(z)
    assert torch.equal(a.embed, b.embed) and torch.equal(a._codebook.cluster_size, b._codebook.cluster_size)


def test_old_fastvq_checkpoints_load():
    """Checkpoints from before the peer's keys: embed (K, D), ema_count, ema_sum, initted at the top."""
    new = VectorQuantizer(dim=3, codebook_size=5, backend="torch")
    old = {
        "embed": torch.randn(5, 3), "ema_count": torch.rand(1, 5) + 1, "ema_sum": torch.randn(1, 5, 3),
        "initted": torch.tensor(True),
    }
    new.load_state_dict(old, strict=True)
    assert torch.equal(new._codebook.embed[0], old["embed"]) and torch.equal(new.codebook, old["embed"])
    assert torch.equal(new._codebook.cluster_size, old["ema_count"])
    assert torch.equal(new._codebook.embed_avg, old["ema_sum"])
    heads = VectorQuantizer(dim=4, codebook_size=5, codebook_dim=2, heads=2, separate_codebook_per_head=True)
    old_heads = {k: v for k, v in heads.state_dict().items() if not k.startswith("_codebook")}
    old_heads |= {"embed": torch.randn(2, 5, 2), "ema_count": torch.ones(2, 5), "ema_sum": torch.randn(2, 5, 2),
                  "initted": torch.tensor(True)}
    heads.load_state_dict(old_heads, strict=True)
    assert torch.equal(heads.codebook, old_heads["embed"])


def test_ema_layer_compiles_without_graph_breaks():
    torch._dynamo.reset()
    vq = VectorQuantizer(dim=4, codebook_size=8, ema_update=True, threshold_ema_dead_code=0.5, backend="auto")
    twin = VectorQuantizer(dim=4, codebook_size=8, ema_update=True, threshold_ema_dead_code=0.5, backend="auto")
    twin.load_state_dict(vq.state_dict())
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    z = torch.randn(3, 10, 4, requires_grad=True)
    torch.manual_seed(5)
    out = compiled(z)
    torch.manual_seed(5)
    ref = twin(z)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(vq.embed, twin.embed)
    out.loss.backward()
    assert z.grad is not None


# -- DDP: two gloo processes on CPU ---------------------------------------------------------------


@contextlib.contextmanager
def _gloo_group(rank, world, init_file):
    """A gloo process group for the body, torn down in an order that cannot abort the worker."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        # A rank can return from its last collective while its peer is still receiving that
        # collective's data. If the fast rank then destroys the group, its connections close under
        # the peer's read: the likely cause of a gloo worker once dying with "terminate called
        # without an active exception" (SIGABRT, not reproduced in 40 runs since). The barrier lets
        # every rank finish every collective before any rank tears down. On an exception there is
        # no barrier: mp.spawn reports the error and stops the other rank.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank, world, init_file, out_dir, data, kwargs, steps):
    with _gloo_group(rank, world, init_file):
        torch.manual_seed(0)
        vq = VectorQuantizer(**kwargs)
        vq.train()
        half = data.shape[1] // world
        for step in range(steps):
            vq(data[step, rank * half : (rank + 1) * half])
        state = {"embed": vq.embed.detach(), "ema_count": vq._codebook.cluster_size}
        torch.save(state, os.path.join(out_dir, f"{rank}.pt"))


def _run_ddp(kwargs, data, steps):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp, data, kwargs, steps), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]


def test_ddp_ema_and_kmeans_equal_one_process_on_the_joined_batch():
    kwargs = dict(dim=3, codebook_size=6, ema_update=True, decay=0.7, kmeans_init=True, kmeans_iters=5, backend="torch")
    steps = 3
    data = torch.randn(steps, 64, 3)  # step, joined batch (rank 0: rows 0-31, rank 1: rows 32-63)
    ranks = _run_ddp(kwargs, data, steps)
    assert torch.equal(ranks[0]["embed"], ranks[1]["embed"])
    torch.manual_seed(0)
    single = VectorQuantizer(**kwargs)
    single.train()
    for step in range(steps):
        single(data[step])
    torch.testing.assert_close(ranks[0]["embed"], single.embed.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["ema_count"], single._codebook.cluster_size, rtol=1e-5, atol=1e-6)


def _ddp_residual_worker(rank, world, init_file, out_dir, data):
    from fastvq.quantizers.residual import ResidualVQ

    with _gloo_group(rank, world, init_file):
        torch.manual_seed(0)
        rvq = ResidualVQ(dim=3, codebook_size=5, num_quantizers=4, quantize_dropout=True, ema_update=True,
                         backend="torch")
        rvq.train()
        # Different generators per rank: rank 0's draw must win everywhere, or ranks would run
        # different stages and their collectives would hang or mix.
        gen = torch.Generator().manual_seed(100 + rank)
        kept = [int((rvq(data[rank], generator=gen).indices[0] >= 0).sum()) for _ in range(6)]
        torch.save({"kept": kept, "codebooks": rvq.codebooks.detach()}, os.path.join(out_dir, f"{rank}.pt"))


def test_ddp_residual_quantize_dropout_runs_the_same_stages_on_every_rank():
    data = torch.randn(2, 16, 3)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_residual_worker, args=(2, os.path.join(tmp, "init"), tmp, data), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    assert ranks[0]["kept"] == ranks[1]["kept"]
    assert len(set(ranks[0]["kept"])) > 1  # the draw did vary across steps
    assert torch.equal(ranks[0]["codebooks"], ranks[1]["codebooks"])


def test_ddp_dead_code_replacement_is_identical_on_every_rank():
    kwargs = dict(dim=2, codebook_size=8, threshold_ema_dead_code=0.5, decay=0.5, backend="torch")
    data = torch.randn(3, 40, 2)
    ranks = _run_ddp(kwargs, data, 3)
    assert torch.equal(ranks[0]["embed"], ranks[1]["embed"])
    assert torch.equal(ranks[0]["ema_count"], ranks[1]["ema_count"])
