"""The core package imports without the ``train`` extra (scikit-learn, scikit-image, matplotlib), and
each tool that needs one of them says which package and which extra when it is missing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvision.data.extras import EXTRA, MissingExtraError

ROOT = Path(__file__).resolve().parent.parent
EXTRA_PACKAGES = ("sklearn", "skimage", "matplotlib")


def test_core_imports_do_not_load_the_extra():
    code = (
        "import sys, fastvision, fastvision.nn, fastvision.models, fastvision.data, fastvision.train, "
        "fastvision.viz, fastvision.train.cli\n"
        "fastvision.viz.braille_lines, fastvision.viz.save_denoising_figure\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {EXTRA_PACKAGES!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_fastvision_needs_only_torch_numpy_triton():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import fastvision"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    imported = {
        line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line
    }
    assert not imported & set(EXTRA_PACKAGES)  # (torch itself imports tqdm when present)


def test_pyproject_moves_the_tools_dependencies_to_the_train_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=;\[ ]", dep)[0] for dep in project["dependencies"]}
    assert core.isdisjoint({"scikit-learn", "scikit-image", "matplotlib"})
    assert {"torch", "numpy", "triton"} <= core
    assert set(project["optional-dependencies"][EXTRA]) == {"scikit-learn", "scikit-image", "matplotlib"}
    assert f"fastvision[{EXTRA}]" in project["optional-dependencies"]["test"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    default_extras = re.search(r'EXTRAS="\$\{FASTVISION_EXTRAS:-([^}]*)\}"', setup).group(1).split(",")
    assert EXTRA in default_extras and "test" in default_extras


@pytest.fixture
def without(monkeypatch):
    """``without("sklearn")`` makes ``import sklearn`` (and its submodules) fail in this process."""

    def block(*packages):
        for package in packages:
            for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
                monkeypatch.setitem(sys.modules, name, None)

    return block


def _assert_names(info, package):
    message = str(info.value)
    assert package in message and f"fastvision[{EXTRA}]" in message


def test_embedded_digits_without_scikit_learn(without):
    from fastvision.data import build_dataset, load_embedded_digits

    without("sklearn")
    with pytest.raises(MissingExtraError, match="embedded stand-in digits") as info:
        load_embedded_digits("test")
    _assert_names(info, "scikit-learn")
    with pytest.raises(ImportError, match="scikit-learn"):  # MissingExtraError is an ImportError
        build_dataset("stacked_mnist", "test")


def test_embedded_photos_and_metrics_without_scikit_image(without):
    from fastvision.data import load_photo_crops
    from fastvision.train import psnr, ssim

    without("skimage")
    with pytest.raises(MissingExtraError, match="stand-in photographs") as info:
        load_photo_crops("test", num_samples=4)
    _assert_names(info, "scikit-image")
    images = torch.rand(2, 1, 8, 8)
    for metric in (psnr, ssim):
        with pytest.raises(MissingExtraError, match="PSNR/SSIM") as info:
            metric(images, images)
        _assert_names(info, "scikit-image")


def test_figures_without_matplotlib_or_scikit_learn(without, tmp_path):
    from fastvision.viz import project_2d, save_embedding_plot, write_denoising_png

    features = np.random.default_rng(0).normal(size=(6, 3))
    without("matplotlib")
    with pytest.raises(MissingExtraError, match="figures") as info:
        save_embedding_plot(features, [0, 1, 2, 0, 1, 2], tmp_path / "e.png")
    _assert_names(info, "matplotlib")
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(MissingExtraError, match="denoising figures") as info:
        write_denoising_png(images, images, images, tmp_path / "d.png")
    _assert_names(info, "matplotlib")
    without("sklearn")
    for method, name in (("pca", "PCA"), ("tsne", "t-SNE")):
        with pytest.raises(MissingExtraError, match=name) as info:
            project_2d(features, method)
        _assert_names(info, "scikit-learn")


def test_visualisation_import_paths():
    import importlib

    import fastvision.viz as viz
    import fastvision.viz.denoise as denoise
    import fastvision.viz.digits as digits

    assert denoise.denoising_figure_hook is viz.denoising_figure_hook
    with pytest.raises(ModuleNotFoundError):  # the forwarding shim is gone on purpose
        importlib.import_module("fastvision.denoise_viz")
    assert viz.show_validation_samples is digits.show_validation_samples
    assert set(viz.__all__) <= set(dir(viz))
    for name in viz.__all__:
        assert getattr(viz, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        viz.nothing  # noqa: B018
