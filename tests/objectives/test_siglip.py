"""siglip_loss and the SigLIP objective against OpenCLIP's SigLipLoss and the single-process loss, 1 and 2 ranks.

Tolerance: rtol 1e-5, atol 1e-6 in fp32 (the same as the clip tests); 2-rank unmasked results match
OpenCLIP's to the last bit in practice, since both sum the same blocks.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss
from shardkit import fresh_env

from mmpt.contracts import Batch, EncoderOutput
from mmpt.objectives.contrastive import GatherMode, clip_loss
from mmpt.objectives.siglip import SigLIP, SimulatedRing, blockwise_sigmoid_loss, exchange_order, siglip_loss
from mmpt.registry import ConfigError, objectives
from mmpt.training.engine import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import _clip_ranks as ranks_worker  # noqa: E402  (the shared 2-rank harness)


def features(n: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded unit-norm paired features, b correlated with a."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return a, F.normalize(a + 0.7 * torch.randn(n, dim, generator=g), dim=-1)


def with_grads(fn, a: torch.Tensor, b: torch.Tensor, scale: float = 10.0, bias: float = -10.0):
    """Call ``fn(a, b, scale, bias)`` on fresh leaves; return loss and grads w.r.t. a, b, scale and bias."""
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    s, t = torch.tensor([scale], requires_grad=True), torch.tensor([bias], requires_grad=True)
    loss = fn(a, b, s, t)
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad, t.grad


NAMES = ("loss", "grad a", "grad b", "grad scale", "grad bias")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def ours(valid: torch.Tensor | None = None, exchange: str = "bidir"):
    return lambda a, b, s, t: siglip_loss(a, b, s, t, exchange=exchange, valid=valid)[0]


def openclip_on(valid: torch.Tensor | None = None):
    """OpenCLIP's SigLipLoss on the present rows only (all rows when ``valid`` is None)."""
    return lambda a, b, s, t: SigLipLoss()(a if valid is None else a[valid], b if valid is None else b[valid], s, t)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5), (50.0, -2.0)])
@pytest.mark.parametrize("exchange", ["bidir", "ring", "local"])
def test_single_process_matches_openclip(scale: float, bias: float, exchange: str) -> None:
    a, b = features()
    for name, o, r in zip(NAMES, with_grads(ours(exchange=exchange), a, b, scale, bias),
                          with_grads(openclip_on(), a, b, scale, bias), strict=True):
        assert_close(o, r, name)


def test_bf16_inputs_give_fp32_loss() -> None:
    a, b = features()
    loss, metrics = siglip_loss(a.bfloat16(), b.bfloat16(), torch.tensor([10.0]), torch.tensor([-10.0]))
    assert loss.dtype == torch.float32 and metrics["acc"].dtype == torch.float32
    assert_close(loss, SigLipLoss()(a.bfloat16().float(), b.bfloat16().float(), torch.tensor([10.0]),
                                    torch.tensor([-10.0])), "loss")


@pytest.mark.parametrize("absent", [[], [2], [0, 3, 4, 7], [0, 1, 2, 3, 4, 5, 6]])
def test_masked_equals_present_rows_only(absent: list[int]) -> None:
    a, b = features()
    valid = torch.ones(a.shape[0], dtype=torch.bool)
    valid[absent] = False
    got = with_grads(ours(valid), a, b, 5.0, -3.0)
    for name, o, r in zip(NAMES, got, with_grads(openclip_on(valid), a, b, 5.0, -3.0), strict=True):
        assert_close(o, r, name)
    assert torch.count_nonzero(got[1][~valid]) == 0 and torch.count_nonzero(got[2][~valid]) == 0


def test_masked_without_valid_rows_is_a_differentiable_zero() -> None:
    a, b = features()
    loss, *grads = with_grads(ours(torch.zeros(a.shape[0], dtype=torch.bool)), a, b)
    assert loss.item() == 0.0
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("absent", [[], [0, 3], [1, 2, 5, 6]])
def test_accuracy_equals_argmax_of_the_full_matrix(absent: list[int]) -> None:
    # clip_loss takes the argmax of the full (masked) logit matrix; siglip never builds it.
    a, b = features(16, seed=3)
    b = b.clone()
    b[4] = a[9]  # row 4 and column 9 now miss
    valid = torch.ones(16, dtype=torch.bool)
    valid[absent] = False
    got = siglip_loss(a, b, torch.tensor([10.0]), torch.tensor([-10.0]), valid=valid)[1]
    ref = clip_loss(a, b, torch.tensor([10.0]), gather=GatherMode(), valid=valid)[1]
    assert 0 < ref["acc"].item() < 1
    assert_close(got["acc"], ref["acc"], "acc")
    assert_close(got["acc_ba"], ref["acc_ba"], "acc_ba")


# ---- the SigLIP objective -------------------------------------------------------------------------


def encoded(**embeddings: torch.Tensor) -> dict[str, EncoderOutput]:
    return {m: EncoderOutput(tokens=e[:, None], mask=None, pooled=e, embedding=e) for m, e in embeddings.items()}


def batch_with(present: dict[str, torch.Tensor], n: int) -> Batch:
    return Batch(fields={}, present=present, keys=[str(i) for i in range(n)])


def test_siglip_registered_with_the_papers_init_and_validates_config() -> None:
    obj = objectives.build("siglip", pairs=[["image", "text"]])
    assert isinstance(obj, SigLIP) and obj.modalities == ("image", "text") and obj.token_modalities == ()
    assert_close(obj.logit_scale.detach(), torch.tensor([math.log(10.0)]), "init log scale")
    assert_close(obj.logit_bias.detach(), torch.tensor([-10.0]), "init bias")
    assert obj.no_weight_decay() == {"logit_scale", "logit_bias"} <= set(dict(obj.named_parameters()))
    with pytest.raises(ConfigError, match="siglip.exchange.*bidir"):
        SigLIP(pairs=[["image", "text"]], exchange="bidi")
    with pytest.raises(ConfigError, match=r"siglip.pairs\[0\]"):
        SigLIP(pairs=[["image", "image"]])
    with pytest.raises(ConfigError, match="init_logit_scale"):
        SigLIP(pairs=[["image", "text"]], init_logit_scale=0.0)
    frozen = SigLIP(pairs=[["image", "text"]], learn_logit_scale=False)
    assert not frozen.logit_scale.requires_grad and not frozen.logit_bias.requires_grad


def test_siglip_pairs_with_missing_modality_and_metrics() -> None:
    n = 8
    img, txt = features(n, seed=1)
    aud, _ = features(n, seed=2)
    audio_present = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    obj = SigLIP(pairs=[["image", "text"], ["audio", "text"]])
    out = obj(encoded(image=img, text=txt, audio=aud), batch_with({"audio": audio_present}, n))
    s, t = torch.tensor([10.0]), torch.tensor([-10.0])
    expected = (SigLipLoss()(img, txt, s, t) + SigLipLoss()(aud[audio_present], txt[audio_present], s, t)) / 2
    assert_close(out.loss, expected, "loss")
    assert set(out.metrics) == {f"{p}/{k}" for p in ("image_text", "audio_text")
                                for k in ("acc", "logit_scale", "logit_bias")} | {"text_image/acc", "text_audio/acc"}
    assert all(not v.requires_grad for v in out.metrics.values())
    assert_close(out.metrics["audio_text/logit_bias"], torch.tensor(-10.0), "bias metric")
    out.loss.backward()
    assert torch.count_nonzero(obj.logit_scale.grad) == 2 and torch.count_nonzero(obj.logit_bias.grad) == 2
    with pytest.raises(KeyError, match="siglip: no encoder output for modality 'audio'"):
        obj(encoded(image=img, text=txt), batch_with({}, n))


# ---- two ranks (gloo), in the clip harness ---------------------------------------------------------



@pytest.fixture(scope="module")
def rank_results(objective_ranks) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each rank's siglip scenarios from the shared 2-rank launch (conftest.py)."""
    return objective_ranks("siglip")


def _averaged(res: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """What ranks that average gradients see: mean loss, concatenated feature grads / W, mean param grads.
    Each rank's feature grad already sums every rank's loss (the exchange sends grads home)."""
    w = len(res)
    return (torch.stack([r["loss"] for r in res]).mean(), torch.cat([r["grad_a"] for r in res]) / w,
            torch.cat([r["grad_b"] for r in res]) / w, torch.stack([r["grad_scale"] for r in res]).mean(0),
            torch.stack([r["grad_bias"] for r in res]).mean(0))


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_two_ranks(rank_results: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    a_glob, b_glob = ranks_worker.global_inputs()
    scale, bias = ranks_worker.SCALE, ranks_worker.SIGLIP_BIAS
    for exchange in ranks_worker.SIGLIP_EXCHANGES:
        for mask_name, mask in ranks_worker.global_masks().items():
            key = f"siglip/{exchange}/{mask_name}"
            res = [r[key] for r in rank_results]
            if mask is None:
                # OpenCLIP's 2-rank SigLipLoss (bidir / shift) with the same inputs, rank by rank.
                for rank, r in enumerate(res):
                    for name in ("loss", "grad_a", "grad_b", "grad_scale", "grad_bias"):
                        assert_close(r[name], r[f"ref_{name}"], f"{key} rank {rank} {name} vs OpenCLIP")
                ref_acc = siglip_loss(a_glob, b_glob, torch.tensor([scale]), torch.tensor([bias]))[1]
                for k in ("acc", "acc_ba"):
                    assert_close(torch.stack([r[k] for r in res]).mean(), ref_acc[k], f"{key} {k}")
            # The single-process loss and gradients of the concatenated batch (present rows only).
            valid = torch.ones(len(a_glob), dtype=torch.bool) if mask is None else mask
            if valid.any():
                single = with_grads(openclip_on(valid), a_glob, b_glob, scale, bias)
            else:
                single = (torch.tensor(0.0), torch.zeros_like(a_glob), torch.zeros_like(b_glob), torch.zeros(1),
                          torch.zeros(1))
            for name, got, ref in zip(NAMES, _averaged(res), single, strict=True):
                assert_close(got, ref, f"{key} {name} vs single process")

    # The module across ranks equals the module on the concatenated batch in one process.
    some = ranks_worker.global_masks()["some"]
    obj = SigLIP(pairs=[["image", "text"]])
    a, b = a_glob.clone().requires_grad_(True), b_glob.clone().requires_grad_(True)
    out = obj(encoded(image=a, text=b), batch_with({"image": some}, len(a)))
    out.loss.backward()
    single = (out.loss.detach(), a.grad, b.grad, obj.logit_scale.grad, obj.logit_bias.grad)
    for name, got, ref in zip(NAMES, _averaged([r["siglip/module"] for r in rank_results]), single, strict=True):
        assert_close(got, ref, f"module {name}")

    # Chunked (the default, checked above against OpenCLIP and one process) equals the unchunked path.
    for exchange in ranks_worker.SIGLIP_EXCHANGES:
        for mask_name in ranks_worker.global_masks():
            key = f"siglip/{exchange}/{mask_name}"
            for rank, r in enumerate(rank_results):
                for name, value in r[f"{key}/unchunked"].items():
                    assert_close(r[key][name], value, f"{key} rank {rank} {name} chunked vs unchunked")


# ---- chunked == unchunked == the full matrix: 4 gloo ranks, and a world of 64 simulated ---------------


def full_matrix(valid: torch.Tensor | None = None):
    """The naive sigmoid loss on the whole (N, N) logit matrix of the concatenated batch."""

    def loss(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = a.shape[0]
        keep = torch.ones(n, dtype=torch.bool) if valid is None else valid
        terms = F.logsigmoid((2 * torch.eye(n) - 1) * (s * a @ b.T + t)) * (keep[:, None] & keep[None])
        return -terms.sum() / keep.sum().clamp(min=1)

    return loss


def reference(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return with_grads(full_matrix(valid), a, b, ranks_worker.SCALE, ranks_worker.SIGLIP_BIAS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Each rank's scenarios from one 4-rank launch of ``_siglip_ranks.py``."""
    out = tmp_path_factory.mktemp("siglip_ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "_siglip_ranks.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=fresh_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"ranks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return [torch.load(out / f"siglip_rank{r}.pt") for r in range(4)]


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_four_ranks_chunked_equals_unchunked_and_full_matrix(four_ranks) -> None:
    import _siglip_ranks

    a_glob, b_glob = _siglip_ranks.global_inputs(4)
    for exchange in _siglip_ranks.EXCHANGES:
        for mask_name, mask in _siglip_ranks.global_masks(4).items():
            key = f"{exchange}/{mask_name}"
            chunked = [r[f"{key}/chunked"] for r in four_ranks]
            for rank, r in enumerate(four_ranks):
                for name, value in r[f"{key}/unchunked"].items():
                    assert_close(chunked[rank][name], value, f"{key} rank {rank} {name} chunked vs unchunked")
            for name, got, ref in zip(NAMES, _averaged(chunked), reference(a_glob, b_glob, mask), strict=True):
                assert_close(got, ref, f"{key} {name} vs full matrix")


def simulated(a_all: torch.Tensor, b_all: torch.Tensor, world: int, exchange: str,
              valid: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Every rank of a simulated world in turn, each fed the other ranks' blocks in its exchange's order;
    returns what ranks averaging gradients see (as ``_averaged``), the b gradients summed over ranks."""
    n = a_all.shape[0] // world
    losses, grads_a, grads_scale, grads_bias = [], [], [], []
    grad_b = torch.zeros_like(b_all)
    for rank in range(world):
        feed = SimulatedRing(b_all, rank, world, exchange)
        assert sorted(exchange_order(rank, world, exchange)) == list(range(world))
        a, b = (x[rank * n:(rank + 1) * n].clone().requires_grad_(True) for x in (a_all, b_all))
        s, t = torch.tensor([ranks_worker.SCALE], requires_grad=True), torch.tensor([ranks_worker.SIGLIP_BIAS],
                                                                                 requires_grad=True)
        total, _ = blockwise_sigmoid_loss(a, b, s.reshape(()), t.reshape(()), rank=rank, world=world, feed=feed,
                                          valid_all=valid)
        count = torch.tensor(float(len(a_all))) if valid is None else valid.sum().float()
        loss = total / (count.clamp(min=1) / world)
        loss.backward()
        losses.append(loss.detach())
        grads_a.append(a.grad)
        grads_scale.append(s.grad)
        grads_bias.append(t.grad)
        grad_b[rank * n:(rank + 1) * n] += b.grad
        for origin, g in feed.grads.items():
            if origin != rank:
                grad_b[origin * n:(origin + 1) * n] += g
    return (torch.stack(losses).mean(), torch.cat(grads_a) / world, grad_b / world,
            torch.stack(grads_scale).mean(0), torch.stack(grads_bias).mean(0))


@pytest.mark.parametrize("exchange", ["bidir", "ring"])
@pytest.mark.parametrize("world", [3, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_simulated_world_equals_full_matrix(world: int, exchange: str, masked: bool) -> None:
    a_all, b_all = features(world * 4, seed=world)
    valid = None
    if masked:
        valid = torch.rand(len(a_all), generator=torch.Generator().manual_seed(5)) > 0.3
    for name, got, ref in zip(NAMES, simulated(a_all, b_all, world, exchange, valid),
                              reference(a_all, b_all, valid), strict=True):
        assert_close(got, ref, f"world {world} {exchange} {name}")


def loss_peak_bytes(world: int, chunked: bool, n: int = 32, dim: int = 16) -> int:
    """Peak CPU allocator bytes of one simulated rank's loss forward + backward (blocks made on arrival,
    their gradient accumulators dropped as the ring would send them on)."""
    from torch.profiler import ProfilerActivity, profile

    a, b = (x.requires_grad_(True) for x in features(n, dim))
    s, t = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    def feed(own: torch.Tensor, grads: bool):
        for origin in exchange_order(0, world, "bidir"):
            block = own if origin == 0 else features(n, dim, seed=origin)[1].requires_grad_(not chunked)
            yield origin, block, torch.zeros(block.shape) if grads else None

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        total, best = blockwise_sigmoid_loss(a, b, s, t, rank=0, world=world, feed=feed, chunked=chunked)
        del best
        total.backward()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_chunked_loss_memory_does_not_grow_with_the_world() -> None:
    assert loss_peak_bytes(64, chunked=True) == loss_peak_bytes(4, chunked=True)
    assert loss_peak_bytes(64, chunked=False) > 8 * loss_peak_bytes(4, chunked=False)  # the test can see growth
