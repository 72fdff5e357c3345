"""The seed-001 digit readers (ViT classifier, encoder-decoder 4-digit reader), their attention
module and the visualisations. CPU, small shapes; the whole file runs in well under a minute."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvision
from fastvision.data import StackedDigits, load_embedded_digits
from fastvision.models.digit_seq_transformer import (
    START_TOKEN,
    DigitSequenceTransformer,
    digit_seq_transformer,
)
from fastvision.models.registry import get_model_spec, register_model
from fastvision.models.vit_mnist import ViTMNIST, vit_mnist
from fastvision.nn.attention import MultiHeadAttention
from fastvision.train import TrainConfig, Trainer
from fastvision.viz import (
    BrailleValidationHook,
    attention_heatmaps,
    braille_lines,
    embedding_features,
    render_samples,
    save_attention_maps,
    save_embedding_plot,
    use_color,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_seq_model(**kw) -> DigitSequenceTransformer:
    base = dict(dim=32, encoder_depth=2, decoder_depth=2, heads=4, dropout=0.0)
    return DigitSequenceTransformer(**{**base, **kw})


def small_vit(**kw) -> ViTMNIST:
    return ViTMNIST(**{**dict(dim=32, depth=2, heads=4, dropout=0.0), **kw})


@pytest.fixture(scope="module")
def digits():
    return load_embedded_digits("train")


@pytest.fixture(scope="module")
def grids(digits):
    return StackedDigits(digits, 64, seed=3)


def batch_of(dataset, n):
    images, labels = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(images), torch.stack([torch.as_tensor(label) for label in labels])


# ------------------------------------------------------------------------------------------- attention


def _torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's MultiheadAttention with our weights: its in_proj is the same stacked [q; k; v] layout."""
    ref = nn.MultiheadAttention(ours.dim, ours.heads, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    return ref


@pytest.mark.parametrize("mode", ["self", "cross", "causal"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_matches_torch_multihead_attention(mode, need_weights):
    torch.manual_seed(0)
    attn = MultiHeadAttention(24, 3).double().eval()
    ref = _torch_mha(attn)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    context = torch.randn(2, 7, 24, dtype=torch.float64) if mode == "cross" else None
    kv = x if context is None else context
    mask = (
        nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64) if mode == "causal" else None
    )
    expected, expected_weights = ref(x, kv, kv, attn_mask=mask, need_weights=True, average_attn_weights=True)
    result = attn(x, context, is_causal=mode == "causal", need_weights=need_weights)
    actual = result[0] if need_weights else result
    torch.testing.assert_close(actual, expected)
    if need_weights:
        torch.testing.assert_close(result[1], expected_weights)
        torch.testing.assert_close(result[1].sum(-1), torch.ones(2, 5, dtype=torch.float64))
        if mode == "causal":
            assert torch.all(result[1].triu(1) == 0)


def test_attention_float_and_bool_masks_agree():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(3, 6, 16)
    allowed = torch.rand(3, 1, 6, 6) > 0.3
    allowed[..., 0] = True  # every query keeps at least one key
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    fused = attn(x, attn_mask=allowed)
    explicit, _ = attn(x, attn_mask=allowed, need_weights=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, attn_mask=additive), fused, atol=1e-5, rtol=1e-5)


def test_attention_errors():
    with pytest.raises(ValueError, match="multiple of heads"):
        MultiHeadAttention(10, 3)
    attn = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="context must have shape"):
        attn(torch.randn(2, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="either is_causal"):
        attn(torch.randn(2, 3, 8), is_causal=True, attn_mask=torch.ones(3, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------- ViT


def test_vit_shapes_attention_and_parameter_count():
    model = vit_mnist().eval()
    x = torch.rand(3, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (3, 10)
    assert model.last_attention is None
    torch.testing.assert_close(model(x, return_attention=True), logits)
    attention = model.last_attention
    assert attention.shape == (3, 50, 50)  # CLS + 7x7 patches
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 50))
    torch.testing.assert_close(model.attention_maps(x), attention)
    assert model.embed(x).shape == (3, 128)

    d, hidden, tokens = 128, 512, 50
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden + hidden * d + d) + 4 * d
    expected = (16 * d + d) + d + tokens * d + 4 * block + (d * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected  # about 0.8 M


def test_vit_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="images must have shape"):
        vit_mnist()(torch.rand(2, 1, 32, 32))


def test_vit_compiles_fullgraph():
    torch.manual_seed(0)
    model = small_vit().eval()
    x = torch.rand(4, 1, 28, 28)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- encoder-decoder reader


def test_seq_model_shapes_and_parameter_count():
    model = digit_seq_transformer().eval()
    x = torch.rand(2, 1, 56, 56)
    targets = torch.randint(0, 10, (2, 4))
    assert model(x, targets).shape == (2, 4, 10)
    digits = model.generate(x)
    assert digits.shape == (2, 4) and digits.dtype == torch.int64
    assert digits.min() >= 0 and digits.max() <= 9  # never the start token
    assert model.encode(x).shape == (2, 4, 256)
    attention = model.attention_maps(x)
    assert attention.shape == (2, 64, 64)  # 8x8 patches, no CLS
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 64))

    d, hidden = 256, 1024
    attn = d * 3 * d + 3 * d + d * d + d
    ff = d * hidden + hidden + hidden * d + d
    encoder_block, decoder_block = attn + ff + 4 * d, 2 * attn + ff + 6 * d
    embeddings = (49 * d + d) + 64 * d + 4 * d + 11 * d + 4 * d
    expected = embeddings + 6 * encoder_block + 6 * decoder_block + (d * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected  # about 11 M


def test_quadrant_pooling_order():
    model = small_seq_model()
    # Token value = its (row, col) on the 8x8 grid, so each quadrant's mean is known.
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    tokens = torch.stack([rows, cols], dim=-1).reshape(1, 64, 2)
    pooled = model.pool_quadrants(tokens)[0]
    expected = torch.tensor([[1.5, 1.5], [1.5, 5.5], [5.5, 1.5], [5.5, 5.5]])  # TL, TR, BL, BR
    torch.testing.assert_close(pooled, expected)


def test_teacher_forcing_matches_greedy_generation():
    torch.manual_seed(0)
    model = small_seq_model().eval()
    x = torch.rand(5, 1, 56, 56)
    digits, step_logits = model.generate(x, return_logits=True)
    assert torch.equal(step_logits.argmax(-1), digits)
    # Fed the generated prefix, the teacher-forced pass must reproduce every step's logits.
    torch.testing.assert_close(model(x, digits), step_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changed", [0, 1, 2])
def test_causal_mask_hides_later_targets(changed):
    torch.manual_seed(0)
    model = small_seq_model().eval()
    x = torch.rand(4, 1, 56, 56)
    targets = torch.randint(0, 10, (4, 4))
    edited = targets.clone()
    edited[:, changed] = (edited[:, changed] + 1 + torch.arange(4) % 9) % 10
    before, after = model(x, targets), model(x, edited)
    # Target `changed` is the decoder input of step changed + 1: earlier steps must not move.
    torch.testing.assert_close(after[:, : changed + 1], before[:, : changed + 1], atol=0, rtol=0)
    assert (after[:, changed + 1] - before[:, changed + 1]).abs().amax() > 1e-4
    # The last target is never a decoder input.
    edited_last = targets.clone()
    edited_last[:, 3] = (edited_last[:, 3] + 1) % 10
    torch.testing.assert_close(model(x, edited_last), before, atol=0, rtol=0)


def test_seq_model_input_errors():
    model = small_seq_model()
    with pytest.raises(ValueError, match="targets must have shape"):
        model(torch.rand(2, 1, 56, 56), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.rand(2, 1, 56, 56), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.rand(2, 1, 28, 28), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="2x2 quadrants"):
        DigitSequenceTransformer(image_size=49, patch_size=7)
    assert START_TOKEN == 10


# ---------------------------------------------------------------------------------- both readers


def _both_models():
    torch.manual_seed(0)
    vit = small_vit()
    seq = small_seq_model()
    x_vit, x_seq = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 56, 56)
    targets = torch.randint(0, 10, (3, 4))
    return [
        (vit, lambda m: m(x_vit), lambda: small_vit()),
        (seq, lambda m: m(x_seq, targets), lambda: small_seq_model()),
    ]


def test_state_dict_moves_between_backends():
    for model, run, fresh in _both_models():
        model.eval()
        other = fresh().eval()
        other.load_state_dict(model.state_dict())
        with fastvision.use_backend("reference"):
            expected = run(model)
        torch.testing.assert_close(run(other), expected, atol=1e-5, rtol=1e-5)


def test_registry_entries():
    vit, seq = get_model_spec("vit_mnist"), get_model_spec("digit_seq_transformer")
    assert (vit.task, vit.dataset) == ("classification", "mnist")
    assert (seq.task, seq.dataset) == ("digit_sequence", "stacked_mnist")
    vit_cfg, seq_cfg = (TrainConfig.from_dict(spec.train_defaults) for spec in (vit, seq))  # valid keys
    assert (vit_cfg.batch_size, vit_cfg.epochs, vit_cfg.shift_augment) == (128, 12, 2)
    assert (seq_cfg.batch_size, seq_cfg.epochs, seq_cfg.lr, seq_cfg.shift_augment) == (128, 12, 3e-4, 2)
    assert (seq_cfg.shift_tiles, seq_cfg.redraw_each_epoch) == (2, True)
    assert isinstance(vit.builder(dim=16, depth=1), ViTMNIST)
    assert isinstance(seq.builder(dim=16, encoder_depth=1, decoder_depth=1), DigitSequenceTransformer)


def _overfit(model, inputs, targets, loss_fn, lr, steps=25):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_vit_overfits_a_few_batches(digits):
    torch.manual_seed(0)
    images, labels = batch_of(digits, 16)
    losses = _overfit(small_vit(), images, labels, lambda m, x, y: F.cross_entropy(m(x), y), lr=5e-3)
    assert losses[-1] < 0.8 * losses[0], losses[::6]


def test_seq_model_overfits_a_few_batches(grids):
    torch.manual_seed(0)
    images, targets = batch_of(grids, 8)

    def loss_fn(model, x, y):
        return F.cross_entropy(model(x, y).flatten(0, 1), y.flatten())

    model = small_seq_model(encoder_depth=1, decoder_depth=1)
    losses = _overfit(model, images, targets, loss_fn, lr=5e-3, steps=15)
    assert losses[-1] < 0.8 * losses[0], losses[::6]


# Narrow copies of the two registered readers: the trainer's whole path (data, task, hooks,
# checkpoints) without writing 100+ MB checkpoints of the full-size encoder-decoder.
for _name in ("vit_mnist", "digit_seq_transformer"):
    _spec = get_model_spec(_name)
    register_model(f"test_small_{_name}", task=_spec.task, dataset=_spec.dataset, description="test")(
        small_vit if _name == "vit_mnist" else small_seq_model
    )


@pytest.mark.parametrize("name", ["test_small_vit_mnist", "test_small_digit_seq_transformer"])
def test_trainer_runs_one_tiny_epoch(name, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTVISION_DATA", raising=False)  # the embedded digits, never real files
    cfg = TrainConfig(
        epochs=1, batch_size=8, lr=1e-3, train_samples=16, val_samples=8, test_samples=8, ema_decay=0.0
    )
    stream = io.StringIO()
    summary = Trainer(
        name,
        cfg,
        device="cpu",
        run_dir=tmp_path / name,
        progress=False,
        log=None,
        on_validation=BrailleValidationHook(num_samples=4, stream=stream),
    ).fit()
    assert summary["samples"]["train"] == 16
    assert all(math.isfinite(v) for v in summary["test_metrics"].values())
    shown = stream.getvalue()
    assert "Epoch 1" in shown and "⠀" in shown and "\033[" not in shown  # StringIO is no TTY


# ------------------------------------------------------------------------------------------------- viz


def test_braille_dot_layout():
    image = np.zeros((4, 2))
    image[0, 0] = 1.0  # dot 1
    assert braille_lines(image) == ["⠁"]
    image[3, 1] = 1.0  # dot 8
    assert braille_lines(image) == [chr(0x2800 + 0x01 + 0x80)]
    assert braille_lines(np.ones((8, 4)), threshold=0.5) == ["⣿⣿", "⣿⣿"]
    lines = braille_lines(torch.rand(1, 28, 28))  # 2x4 pixels per character
    assert len(lines) == 7 and all(len(line) == 14 for line in lines)
    assert len(braille_lines(np.zeros((5, 3)))) == 2  # partial cells are padded


def test_render_samples_marks_expected_and_predicted():
    images = torch.rand(3, 1, 56, 56)
    expected = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2]])
    predicted = expected.clone()
    predicted[1, 2] = 3
    text = render_samples(images, expected, predicted, per_row=2, color=False, title="Epoch 3")
    assert text.startswith("Epoch 3")
    assert "1234 ok" in text and "5678→5638 ✗1" in text
    assert "\033[" not in text
    lines = text.splitlines()
    box_top = [line for line in lines if line.startswith("┌")]
    assert len(box_top) == 2 and box_top[0].count("┌") == 2 and box_top[1].count("┌") == 1

    colored = render_samples(images[:2], expected[:2], predicted[:2], color=True)
    assert "\033[31m3\033[0m" in colored  # the wrong digit in red
    assert "\033[32m8\033[0m" in colored  # a right one in green
    with pytest.raises(ValueError, match="square"):
        render_samples(images[:1], [[1, 2, 3]], [[1, 2, 3]])


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_color_only_on_tty_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(_FakeTTY()) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(_FakeTTY())

    monkeypatch.delenv("NO_COLOR")
    stream = _FakeTTY()
    batch = (torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4]))
    scores = F.one_hot(torch.tensor([1, 2, 0, 4]), 10).float()  # classification outputs
    BrailleValidationHook(stream=stream)(None, batch, scores, epoch=0)
    assert "\033[31m0\033[0m" in stream.getvalue()


def test_validation_hook_reads_sequence_outputs():
    stream = io.StringIO()
    batch = (torch.rand(12, 1, 56, 56), torch.randint(0, 10, (12, 4)))
    outputs = {"logits": torch.randn(12, 4, 10), "predicted": batch[1]}
    BrailleValidationHook(num_samples=10, per_row=5, stream=stream)(None, batch, outputs, epoch=4)
    text = stream.getvalue()
    assert "Epoch 5 - first 10 validation samples" in text
    assert text.count("┌") == 10 and text.count(" ok") == 10


def test_attention_heatmaps_follow_cls_or_received_attention():
    attention = torch.zeros(1, 5, 5)
    attention[0, 0, 4] = 1.0  # CLS looks at the last of 2x2 patches (bottom-right)
    heat = attention_heatmaps(attention, num_prefix_tokens=1, image_size=(8, 8))[0]
    assert heat.shape == (8, 8) and heat[7, 7] == 1.0 and heat[0, 0] == 0.0
    received = torch.zeros(1, 4, 4)
    received[0, :, 0] = 1.0  # every query attends to the top-left patch
    heat = attention_heatmaps(received, num_prefix_tokens=0, image_size=(8, 8))[0]
    assert heat[0, 0] == 1.0 and heat[7, 7] == 0.0


def test_figures_are_written(tmp_path, digits, grids):
    torch.manual_seed(0)
    vit, seq = small_vit(), small_seq_model()
    images, labels = batch_of(digits, 30)
    grid_images, grid_labels = batch_of(grids, 8)
    paths = [
        save_attention_maps(vit, images, tmp_path / "vit_attention.png", labels=labels, max_images=4),
        save_attention_maps(
            seq, grid_images, tmp_path / "seq_attention.png", labels=grid_labels, max_images=3
        ),
        save_embedding_plot(*embedding_features(vit, images, labels), tmp_path / "vit_pca.png"),
        save_embedding_plot(
            *embedding_features(seq, grid_images, grid_labels), tmp_path / "seq_tsne.png", "tsne"
        ),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path
    assert vit.training  # the helpers restore the model's mode
    with pytest.raises(ValueError, match="method"):
        save_embedding_plot(np.random.rand(10, 4), np.arange(10), tmp_path / "x.png", method="umap")


def test_save_model_figures_for_each_reader(tmp_path, digits, grids):
    from fastvision.viz import save_model_figures

    torch.manual_seed(0)
    names = ["attention.png", "embedding_pca.png", "embedding_tsne.png"]
    for model, dataset, folder in ((small_vit(), digits, "vit"), (small_seq_model(), grids, "seq")):
        paths = save_model_figures(model, dataset, tmp_path / folder, points=40)
        assert [path.name for path in paths] == names
        for path in paths:
            assert path.read_bytes().startswith(PNG_SIGNATURE), path
    assert save_model_figures(nn.Linear(2, 2), digits, tmp_path / "none") == []  # nothing to draw


def test_shared_transformer_blocks_keep_their_state_dict_keys():
    """The blocks live in fastvision.nn.transformer; checkpoints saved before the move still load
    because the parameter names are those of the blocks' attributes, listed here as they were."""
    from fastvision.models import digit_seq_transformer
    from fastvision.models import vit_mnist as vit_module
    from fastvision.nn import TransformerDecoderBlock, TransformerEncoderBlock, transformer

    assert vit_module.TransformerEncoderBlock is TransformerEncoderBlock
    assert transformer.TransformerEncoderBlock is TransformerEncoderBlock
    assert digit_seq_transformer.TransformerDecoderBlock is TransformerDecoderBlock
    attention = ["proj.bias", "proj.weight", "qkv.bias", "qkv.weight"]
    ff = ["ff.proj_in.bias", "ff.proj_in.weight", "ff.proj_out.bias", "ff.proj_out.weight"]
    norms = [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
    encoder = {*(f"attn.{k}" for k in attention), *ff, *norms[:4]}
    decoder = {*(f"{a}.{k}" for a in ("self_attn", "cross_attn") for k in attention), *ff, *norms}
    assert set(TransformerEncoderBlock(8, 2).state_dict()) == encoder
    assert set(TransformerDecoderBlock(8, 2).state_dict()) == decoder
    model = vit_mnist(dim=16, depth=1, heads=2)
    assert {k for k in model.state_dict() if k.startswith("blocks.0.")} == {f"blocks.0.{k}" for k in encoder}
