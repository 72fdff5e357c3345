"""TopKSparseAttention, AdaptiveSparseAttentionMoE (soft and top-1 routing) and the MoE denoiser."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import fastvision
from fastvision.models.registry import create_model, get_model_spec
from fastvision.models.sparse_moe_denoiser import SparseMoEDenoiser
from fastvision.nn.moe import AdaptiveSparseAttentionMoE, TopKSparseAttention
from fastvision.ops.block_topk_attention import block_topk_attention_reference
from fastvision.ops.topk_attention import topk_attention_reference
from fastvision.train.config import TrainConfig
from fastvision.train.tasks import get_task
from tests.conftest import backend_params

DIM, HEADS = 64, 4  # head dim 16


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _moe(routing: str, expert_topk=(3, 6, 40), output_projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return AdaptiveSparseAttentionMoE(
        DIM, HEADS, expert_topk, routing, balance_weight=0.5, output_projection=output_projection
    )


def _tokens(batch=3, tokens=19, seed=1) -> torch.Tensor:
    return torch.randn(batch, tokens, DIM, generator=_seeded(seed))


def _sharpen_router(moe: AdaptiveSparseAttentionMoE, seed: int = 2) -> None:
    """Large random router weights: confident, uneven routing (groups of very different sizes)."""
    with torch.no_grad():
        moe.router.fc2.weight.copy_(3.0 * torch.randn(moe.router.fc2.weight.shape, generator=_seeded(seed)))


def _dense_selection(moe: AdaptiveSparseAttentionMoE, x: torch.Tensor) -> torch.Tensor:
    """Independent top-1 definition: run every expert on every token, pick per token by argmax."""
    probs = moe.router(x)
    outputs = [expert(x) for expert in moe.experts]
    choice = probs.argmax(-1)
    out = torch.zeros_like(x)
    for e, y in enumerate(outputs):
        chosen = (choice == e).unsqueeze(-1)
        out = out + torch.where(chosen, y * probs[..., e : e + 1], torch.zeros_like(y))
    return moe.out_proj(out)


# ------------------------------------------------------------------------------ TopKSparseAttention


def test_topk_sparse_attention_matches_manual_projection():
    torch.manual_seed(0)
    attn = TopKSparseAttention(DIM, HEADS, topk=5)
    x = _tokens()
    out = attn(x)
    assert out.shape == x.shape
    q, k, v = (
        t.view(3, 19, HEADS, DIM // HEADS).transpose(1, 2)
        for t in (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, -1)
    )
    expected = attn.out_proj(topk_attention_reference(q, k, v, 5).transpose(1, 2).reshape(3, 19, DIM))
    torch.testing.assert_close(out, expected)
    # Cross-attention with the tokens themselves as context is self-attention.
    torch.testing.assert_close(attn(x, context=x), out)


def test_topk_sparse_attention_dense_when_topk_covers_keys():
    torch.manual_seed(0)
    attn = TopKSparseAttention(DIM, HEADS, topk=100)
    x, context = _tokens(2, 7), _tokens(2, 11, seed=5)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x, weight[:DIM], bias[:DIM]).view(2, 7, HEADS, -1).transpose(1, 2)
    k, v = (
        t.view(2, 11, HEADS, -1).transpose(1, 2)
        for t in F.linear(context, weight[DIM:], bias[DIM:]).chunk(2, -1)
    )
    dense = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, DIM)
    torch.testing.assert_close(attn(x, context=context), attn.out_proj(dense), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 64, "heads": 5, "topk": 4}, "multiple of heads"),
        ({"dim": 40, "heads": 4, "topk": 4}, "head dim"),
        ({"dim": 64, "heads": 4, "topk": 0}, "topk"),
        ({"dim": 64, "heads": 4, "topk": 4, "dropout": 1.0}, "dropout"),
        ({"dim": 64, "heads": 4, "topk": 4, "mode": "blocks"}, "mode must be one of"),
        ({"dim": 64, "heads": 4, "topk": 4, "mode": "block", "block_size": 48}, "block_size must be one of"),
    ],
)
def test_topk_sparse_attention_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKSparseAttention(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 64, "heads": 4, "topk": 2.5}, "topk"),
        ({"dim": 64, "heads": 4, "topk": 4, "mode": "block", "block_size": True}, "block_size"),
    ],
)
def test_topk_sparse_attention_argument_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        TopKSparseAttention(**kwargs)


def test_topk_sparse_attention_block_mode_matches_manual_projection():
    torch.manual_seed(0)
    attn = TopKSparseAttention(DIM, HEADS, topk=1, mode="block", block_size=16)
    assert "mode='block'" in repr(attn) and TopKSparseAttention(DIM, HEADS, 4).mode == "token"
    x = _tokens(2, 37)
    q, k, v = (
        t.view(2, 37, HEADS, DIM // HEADS).transpose(1, 2)
        for t in (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, -1)
    )
    expected = block_topk_attention_reference(q, k, v, 1, 16).transpose(1, 2).reshape(2, 37, DIM)
    torch.testing.assert_close(attn(x), attn.out_proj(expected))


def test_topk_sparse_attention_input_errors():
    attn = TopKSparseAttention(DIM, HEADS, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(3, DIM))
    with pytest.raises(ValueError, match="context must have shape"):
        attn(torch.randn(2, 5, DIM), context=torch.randn(3, 5, DIM))


# ------------------------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("output_projection", [False, True])
def test_soft_routing_is_the_probability_mixture(output_projection):
    moe = _moe("soft", output_projection=output_projection)
    x = _tokens()
    out = moe(x)
    assert out.shape == x.shape
    probs = moe.router(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 19))
    mixture = sum(probs[..., e : e + 1] * expert(x) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(out, moe.out_proj(mixture))


@pytest.mark.parametrize("output_projection", [False, True])
@pytest.mark.parametrize("router_seed", [2, 3, 4])
def test_top1_routing_selects_the_argmax_expert(output_projection, router_seed):
    moe = _moe("top1", output_projection=output_projection)
    _sharpen_router(moe, router_seed)
    x = _tokens(batch=4, tokens=23)
    out = moe(x)
    choice = moe.router(x).argmax(-1)
    counts = torch.stack([(choice == e).sum(1) for e in range(3)], 1)
    assert counts.amax(0).ne(counts.amin(0)).any(), "the groups should be padded (uneven per image)"
    torch.testing.assert_close(out, _dense_selection(moe, x))
    torch.testing.assert_close(moe.forward_dense_top1(x), out)


def test_top1_gradients_match_dense_selection():
    moe = _moe("top1", output_projection=True)
    _sharpen_router(moe)
    x = _tokens().requires_grad_(True)
    weight = torch.randn(x.shape, generator=_seeded(9))
    (moe(x) * weight).sum().backward()
    grouped = {name: p.grad.clone() for name, p in moe.named_parameters()}
    grad_x = x.grad.clone()
    moe.zero_grad(set_to_none=True)
    x.grad = None
    (_dense_selection(moe, x) * weight).sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(grouped[name], p.grad, msg=name)
    assert grouped["router.fc2.weight"].abs().sum() > 0  # the probability scale trains the router


def test_top1_with_an_unused_expert():
    moe = _moe("top1")
    with torch.no_grad():
        moe.router.fc2.bias.copy_(torch.tensor([0.0, 50.0, -50.0]))  # every token to expert 1
    x = _tokens()
    out = moe(x)
    torch.testing.assert_close(moe.expert_utilization, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(out, _dense_selection(moe, x))


@pytest.mark.parametrize("routing", ["soft", "top1"])
def test_balance_loss_and_utilization(routing):
    moe = _moe(routing)
    _sharpen_router(moe)
    x = _tokens()
    moe(x)
    probs = moe.router(x).detach()
    routed = F.one_hot(probs.argmax(-1), 3).float().mean((0, 1))
    expected = 0.5 * 3 * (routed * probs.mean((0, 1))).sum()
    aux = moe.aux_loss
    assert aux.dim() == 0 and aux.dtype == torch.float32 and math.isfinite(aux.item()) and aux.item() > 0
    torch.testing.assert_close(aux.detach(), expected)
    usage = moe.expert_utilization
    assert usage.shape == (3,) and not usage.requires_grad
    torch.testing.assert_close(usage.sum(), torch.tensor(1.0))
    torch.testing.assert_close(usage, routed if routing == "top1" else probs.mean((0, 1)))
    aux.backward()
    assert moe.router.fc2.weight.grad.abs().sum() > 0 and moe.router.fc1.weight.grad.abs().sum() > 0


def test_balance_loss_of_uniform_routing():
    moe = _moe("soft")
    with torch.no_grad():
        moe.router.fc2.weight.zero_()
        moe.router.fc2.bias.zero_()
    moe(_tokens())
    torch.testing.assert_close(moe.aux_loss.detach(), torch.tensor(0.5))  # = balance_weight
    torch.testing.assert_close(moe.expert_utilization, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("routing", ["soft", "top1"])
def test_gradients_reach_every_parameter(routing):
    moe = _moe(routing, output_projection=True)
    x = _tokens(batch=4, tokens=30).requires_grad_(True)
    (moe(x).square().mean() + moe.aux_loss).backward()
    assert x.grad.abs().sum() > 0
    missing = [n for n, p in moe.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if routing == "top1":  # an expert without tokens gets no gradient; check which were used
        used = {f"experts.{e}." for e in range(3) if moe.expert_utilization[e] > 0}
        missing = [n for n in missing if not n.startswith("experts.") or n[:10] in used]
    assert missing == []


def test_empty_token_set():
    moe = _moe("top1")
    out = moe(torch.randn(2, 0, DIM))
    assert out.shape == (2, 0, DIM)
    assert moe.aux_loss.item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expert_topk": ()}, "at least one"),
        ({"expert_topk": (4, 0)}, "positive ints"),
        ({"routing": "top2"}, "routing must be one of"),
        ({"balance_weight": -1.0}, "balance_weight"),
        ({"router_hidden": 0}, "router_hidden"),
        ({"heads": 3}, "multiple of heads"),
        ({"mode": "tokens"}, "mode must be one of"),
        ({"mode": "block", "block_size": 20}, "block_size must be one of"),
    ],
)
def test_moe_argument_errors(kwargs, match):
    args = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises(ValueError, match=match):
        AdaptiveSparseAttentionMoE(**args)


def test_moe_input_errors_and_copy_after_forward():
    moe = _moe("soft")
    with pytest.raises(ValueError, match="x must have shape"):
        moe(torch.randn(2, 5, DIM + 1))
    moe(_tokens())
    clone = copy.deepcopy(moe)  # the graph-holding aux_loss is not copied
    assert clone.aux_loss is None and moe.aux_loss is not None


@pytest.mark.parametrize("backend", backend_params(("triton",)))
@pytest.mark.parametrize("routing", ["soft", "top1"])
def test_backend_matches_reference(backend, routing, device):
    moe = _moe(routing, expert_topk=(3, 8)).to(device)
    x = _tokens(batch=2, tokens=12).to(device).requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=_seeded(4)).to(device)
    results = {}
    for name in ("reference", backend):
        with fastvision.use_backend(name):
            out = moe(x)
            results[name] = (out, *torch.autograd.grad(out, (x, moe.experts[0].qkv.weight), grad_out))
    for actual, expected in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_block_mode_experts_match_reference(backend, device):
    torch.manual_seed(0)
    moe = AdaptiveSparseAttentionMoE(DIM, HEADS, (1, 2), "top1", mode="block", block_size=16).to(device)
    assert all(expert.mode == "block" and expert.block_size == 16 for expert in moe.experts)
    assert "mode='block'" in repr(moe)
    x = _tokens(batch=2, tokens=40).to(device).requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=_seeded(4)).to(device)
    results = {}
    for name in ("reference", backend):
        with fastvision.use_backend(name):
            out = moe(x)
            results[name] = (out, *torch.autograd.grad(out, (x, moe.experts[1].qkv.weight), grad_out))
    for actual, expected in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------- denoiser


def test_denoiser_parameter_count_and_outputs():
    model = SparseMoEDenoiser()
    assert sum(p.numel() for p in model.parameters()) == 599_689  # the seed model's count
    assert model.aux_loss is None
    images = torch.rand(2, 3, 32, 32, generator=_seeded())
    out = model(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    raw = [block.moe.aux_loss for block in model.blocks]
    torch.testing.assert_close(model.aux_loss, raw[0] + raw[1])
    assert all(block.moe.balance_weight == 1.0 for block in model.blocks)
    assert [u.shape for u in model.expert_utilization()] == [(3,), (3,)]
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.rand(2, 3, 28, 28))


def _router_probs(model: SparseMoEDenoiser, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's router probabilities, recomputed with the blocks' own layers."""
    probs = []
    with torch.no_grad():
        tokens = model.patch_embed(images).flatten(2).transpose(1, 2) + model.pos_embed
        for block in model.blocks:
            probs.append(block.moe.router(block.norm1(tokens)))
            tokens = block(tokens)
    return probs


def test_denoiser_registration_and_single_aux_weighting():
    spec = get_model_spec("sparse_moe_denoiser")
    assert (spec.task, spec.dataset) == ("denoise", "cifar10")
    cfg = TrainConfig.from_dict(spec.train_defaults)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.grad_clip) == (1e-3, 1e-4, 64, 30, 1.0)
    assert (cfg.scheduler, cfg.optimizer, cfg.noise_sigma, cfg.aux_loss_weight) == (
        "cosine",
        "adamw",
        0.2,
        0.01,
    )
    torch.manual_seed(0)
    model = create_model("sparse_moe_denoiser", routing="top1").eval()
    clean = torch.rand(2, 3, 32, 32, generator=_seeded())
    result = get_task("denoise").eval_step(model, (clean, None), cfg, _seeded(3))
    mse = result.sums["mse"] / 2
    # The task adds 0.01 * the unweighted balance losses (balance_weight 1 in the blocks), nothing else.
    aux = model.aux_loss.detach()  # read before _router_probs runs the blocks again
    raw = sum(
        3 * (F.one_hot(p.argmax(-1), 3).float().mean((0, 1)) * p.mean((0, 1))).sum()
        for p in _router_probs(model, result.outputs["noisy"])
    )
    torch.testing.assert_close(aux, raw)
    torch.testing.assert_close(result.loss, mse + 0.01 * raw)


@pytest.mark.parametrize("routing", ["soft", "top1"])
def test_denoiser_optimization_lowers_the_loss(routing):
    from fastvision.data import load_photo_crops

    crops = load_photo_crops("train", num_samples=16, seed=0)
    clean = torch.stack([crops[i][0] for i in range(16)])
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=_seeded())).clamp(0, 1)
    torch.manual_seed(0)
    model = SparseMoEDenoiser(routing=routing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    losses = []
    for _ in range(12):
        loss = F.mse_loss(model(noisy), clean) + 0.01 * model.aux_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_denoiser_state_dict_round_trip_on_reference_backend():
    with fastvision.use_backend("reference"):
        torch.manual_seed(0)
        model = SparseMoEDenoiser(routing="top1").eval()
        images = torch.rand(3, 3, 32, 32, generator=_seeded())
        expected = model(images)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        torch.manual_seed(1)
        restored = SparseMoEDenoiser(routing="soft").eval()  # routing is not part of the weights
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        restored.blocks[0].moe.routing = restored.blocks[1].moe.routing = "top1"
        torch.testing.assert_close(restored(images), expected)
        assert set(model.state_dict()) == set(restored.state_dict())


def test_denoising_figure(tmp_path):
    import matplotlib.image

    from fastvision.viz.denoise import denoising_figure_hook, save_denoising_figure, write_denoising_png

    torch.manual_seed(0)
    model = SparseMoEDenoiser()
    clean = torch.rand(3, 3, 32, 32, generator=_seeded())
    path = save_denoising_figure(model, clean, tmp_path / "figure.png", num_samples=2)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert model.training  # restored after drawing
    hook = denoising_figure_hook(tmp_path / "epochs", num_samples=2)
    hook(model, (clean, None), {"noisy": 0.8 * clean, "denoised": 0.9 * clean}, 0)
    assert (tmp_path / "epochs" / "denoise_epoch001.png").exists()
    with pytest.raises(ValueError, match="share one"):
        write_denoising_png(clean, clean[:2], clean, tmp_path / "bad.png")


def test_denoiser_clamp_keeps_gradient_for_out_of_range_pixels():
    """Outputs stay in [0, 1], but a transposed-conv tap pushed out of range still learns."""
    from fastvision.models.sparse_moe_denoiser import sparse_moe_denoiser

    torch.manual_seed(0)
    model = sparse_moe_denoiser().train()
    with torch.no_grad():
        model.patch_unembed.bias.fill_(5.0)  # every pixel far above 1
    out = model(torch.rand(2, 3, 32, 32))
    assert out.min() >= 0.0 and out.max() <= 1.0
    ((out - 0.5) ** 2).mean().backward()
    assert model.patch_unembed.bias.grad.abs().min() > 0
    assert torch.equal(model.eval()(torch.zeros(1, 3, 32, 32)).clamp(0, 1), model(torch.zeros(1, 3, 32, 32)))
