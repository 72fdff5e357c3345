"""detector_fusion (seed 002's multi-face model), graph attention, and the detector tasks.

A small detector (a 24x8 inner face) keeps these fast; the architecture is the same."""

from __future__ import annotations

import pytest
import torch

from fastvision.data.detector import Detector, DetectorEvents
from fastvision.models import create_model, get_model_spec
from fastvision.models.detector_fusion import CPU_SIZE, DetectorFusion, heteroscedastic_loss
from fastvision.nn.graph import GraphAttention
from fastvision.train.config import TrainConfig
from fastvision.train.tasks import get_task

SMALL = {**CPU_SIZE, "token_dim": 32, "fusion_heads": 4, "hex_dim": 16, "decoder_dim": 16, "head_hidden": 16}


@pytest.fixture(scope="module")
def det() -> Detector:
    return Detector(
        inner_shape=(24, 8), outer_shape=(8, 4), side_shape=(8, 3), pitch_inner=3.0, dead_fraction=0.05
    )


@pytest.fixture(scope="module")
def batch(det):
    data = DetectorEvents(6, seed=2, detector=det)
    return data.counts, data.params, data.live.expand(6, -1).clone()


def _model(det, **kw) -> DetectorFusion:
    torch.manual_seed(0)
    return DetectorFusion(det, **{**SMALL, **kw}).eval()


def test_registered():
    for name in (
        "detector_fusion",
        "detector_fusion_cpu_mse",
        "detector_fusion_cpu_beta_nll",
        "detector_fusion_cpu_faithful",
    ):
        spec = get_model_spec(name)
        assert spec.task == "detector_regression" and spec.dataset == "detector"
    model = create_model("detector_fusion_cpu_beta_nll")
    assert model.loss_kind == "beta_nll" and model.token_dim == 64
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_shapes(det, batch):
    counts, params, live = batch
    model = _model(det)
    out = model(counts, live)
    assert out.mu.shape == (6, 4) and out.log_var.shape == (6, 4)
    hidden = model.random_mask(live, 0.6, generator=torch.Generator().manual_seed(0))
    inp = model(counts, live, hidden)
    assert inp.mean.shape == (6, det.num_sensors) and inp.log_var.shape == (6, det.num_sensors)
    assert inp.loss.dim() == 0 and torch.isfinite(inp.loss)
    value, sigma = model.destandardize(out.mu, out.log_var)
    assert value.shape == sigma.shape == (6, 4) and (sigma > 0).all()
    torch.testing.assert_close(model.destandardize(model.standardize(params)), params)


def test_random_mask(det, batch):
    _, _, live = batch
    model = _model(det)
    hidden = model.random_mask(live, 0.6, generator=torch.Generator().manual_seed(1))
    assert not (hidden & ~live).any()
    for sl in det.face_slices.values():
        n_live = int(live[0, sl].sum())
        assert (hidden[:, sl].sum(1) == round(0.6 * n_live)).all()
    with pytest.raises(ValueError, match="ratio"):
        model.random_mask(live, 0.0)


def test_hidden_and_dead_sensors_do_not_leak(det, batch):
    counts, _, live = batch
    model = _model(det)
    hidden = model.random_mask(live, 0.6, generator=torch.Generator().manual_seed(2))
    noise = torch.rand(counts.shape) * 1000
    changed = torch.where(hidden | ~live, noise, counts)
    a, b = model(counts, live, hidden), model(changed, live, hidden)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.log_var, b.log_var)
    dead_changed = torch.where(~live, noise, counts)
    torch.testing.assert_close(model(counts, live).mu, model(dead_changed, live).mu)
    # ... while a visible sensor does change the prediction.
    visible = torch.where(live & ~hidden, noise, counts)
    assert not torch.allclose(model(visible, live, hidden).mean, a.mean)


def test_losses_match_the_seed_formulas():
    torch.manual_seed(0)
    y, mu, log_var = torch.randn(3, 50, 4).unbind(0)
    var = torch.exp(log_var)
    seed_beta = (var.detach() ** 0.5 * 0.5 * (log_var + (y - mu) ** 2 / var)).mean()
    seed_faithful = (
        0.5 * (y - mu) ** 2 / var.detach() + 0.5 * (log_var + (y - mu.detach()) ** 2 / var)
    ).mean()
    torch.testing.assert_close(heteroscedastic_loss("beta_nll", y, mu, log_var, 0.5), seed_beta)
    torch.testing.assert_close(heteroscedastic_loss("faithful", y, mu, log_var, 0.5), seed_faithful)
    torch.testing.assert_close(heteroscedastic_loss("mse", y, mu, log_var, 0.5), ((y - mu) ** 2).mean())
    # Gradients: faithful gives the mean (mu - y) / [var]; beta-NLL [var]^beta (mu - y) / var.
    n = y.numel()
    for kind, expected in (("faithful", (mu - y) / var / n), ("beta_nll", var**0.5 * (mu - y) / var / n)):
        m, lv = mu.clone().requires_grad_(), log_var.clone().requires_grad_()
        heteroscedastic_loss(kind, y, m, lv, 0.5).backward()
        torch.testing.assert_close(m.grad, expected)
        if kind == "faithful":  # the variance sees the stopped mean: d/dlv = 0.5 (1 - (y - mu)^2 / var)
            torch.testing.assert_close(lv.grad, 0.5 * (1 - (y - mu) ** 2 / var) / n)


@pytest.mark.parametrize("loss", ["mse", "faithful"])
def test_gradients_reach_every_branch(det, batch, loss):
    counts, params, live = batch
    model = _model(det, loss=loss).train()
    model.regression_loss(model(counts, live), params).backward()
    for name in ("rect.inner.stem.0.weight", "rect.upstream.stem.0.weight", "hex.embed.weight",
                 "fusion.0.attn.to_q.weight", "head.mean.0.weight", "face_embed.pos_embed"):  # fmt: skip
        param = dict(model.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    log_var_grad = model.head.log_var[0].weight.grad
    if loss == "mse":
        assert log_var_grad is None
    else:
        assert log_var_grad.abs().sum() > 0
    model.zero_grad()
    hidden = model.random_mask(live, 0.6)
    model(counts, live, hidden).loss.backward()
    assert model.rect["inner"].dec_out.weight.grad.abs().sum() > 0
    assert model.hex.dec[-1].weight.grad.abs().sum() > 0


def test_constructor_checks(det):
    cases = [
        ({"loss": "huber"}, ValueError, "loss"),
        ({"token_dim": 0}, ValueError, "token_dim"),
        ({"token_dim": 30}, ValueError, "heads"),
        ({"dims": "16"}, TypeError, "dims"),
        ({"dims": (16, 32), "depths": (1,)}, ValueError, "depths"),
        ({"kernel_size": 4}, ValueError, "kernel_size"),
        ({"beta": 2.0}, ValueError, "beta"),
        ({"beta": "half"}, TypeError, "beta"),
        ({"count_scale": -1.0}, ValueError, "count_scale"),
        ({"hex_depth": 1.5}, TypeError, "hex_depth"),
    ]
    for kwargs, error, word in cases:
        with pytest.raises(error, match=word):
            DetectorFusion(det, **{**SMALL, **kwargs})
    with pytest.raises(TypeError, match="detector"):
        DetectorFusion(detector="default")
    model = _model(det)
    with pytest.raises(ValueError, match="counts"):
        model(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="live"):
        model(torch.zeros(2, det.num_sensors), torch.ones(2, det.num_sensors))


def test_graph_attention_respects_graph_and_mask():
    torch.manual_seed(0)
    adj = torch.zeros(5, 5, dtype=torch.bool)
    for i, j in ((0, 1), (1, 2), (2, 3), (3, 4)):
        adj[i, j] = adj[j, i] = True
    layer = GraphAttention(8, adj, heads=2).eval()
    x = torch.randn(2, 5, 8)
    y = x.clone()
    y[:, 4] += 5.0  # node 4 is not a neighbour of node 0..2
    torch.testing.assert_close(layer(x)[:, :3], layer(y)[:, :3])
    assert not torch.allclose(layer(x)[:, 3], layer(y)[:, 3])
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 4] = True  # hidden: no longer read by node 3
    torch.testing.assert_close(layer(x, mask)[:, :4], layer(y, mask)[:, :4])
    all_hidden = torch.ones(2, 5, dtype=torch.bool)
    assert torch.isfinite(layer(x, all_hidden)).all()
    with pytest.raises(TypeError, match="adjacency"):
        GraphAttention(8, adj.float())
    with pytest.raises(ValueError, match="dim"):
        GraphAttention(6, adj, heads=4)


def test_tasks(det, batch):
    model = _model(det).train()
    cfg = TrainConfig(mask_ratio=0.6)
    reg = get_task("detector_regression").train_step(model, batch, cfg)
    assert torch.isfinite(reg.loss) and reg.count == 6
    assert 0 <= float(reg.sums["within_1sigma"]) <= 6
    pre = get_task("detector_pretrain").eval_step(model.eval(), batch, cfg, torch.Generator().manual_seed(0))
    assert {"loss", "masked_mse", "neighbour_mse"} <= set(pre.sums)
    assert all(torch.isfinite(v) for v in pre.sums.values())


@pytest.mark.parametrize("stop", [True, False])
def test_variance_stop_gradient(det, batch, stop):
    counts, _, live = batch
    model = _model(det, loss="faithful", variance_stop_gradient=stop).train()
    assert _model(det, loss="faithful").variance_stop_gradient  # the faithful default
    assert not _model(det, loss="beta_nll").variance_stop_gradient
    model(counts, live).log_var.sum().backward()
    stem = model.rect["inner"].stem[0].weight.grad
    reached = stem is not None and stem.abs().sum() > 0
    assert reached != stop
    assert model.head.log_var[0].weight.grad.abs().sum() > 0
