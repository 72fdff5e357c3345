"""Checkpoints survive a kill at any point, and damaged files give one clear error naming the file.

The kill tests run a tiny training run in a subprocess that SIGKILLs itself at a named point of a
checkpoint save (``FASTVISION_CHECKPOINT_CRASH``), then resume it in this process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvision.cli import run_command
from fastvision.train import evaluate_checkpoint, load_checkpoint, save_checkpoint
from fastvision.train.checkpoint import (
    CRASH_ENV_VAR,
    HEADER_SIZE,
    CheckpointError,
    remove_stale_temporaries,
)

MODEL = "test_reliability_ckpt_cls"

# Shared by the subprocess and this process: a tiny classifier on fixed synthetic data.
SETUP = textwrap.dedent(
    f"""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from fastvision.models import register_model
    from fastvision.train import TrainConfig, Trainer

    register_model({MODEL!r}, task="classification", dataset="mnist", description="test")(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    )

    def data():
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 3, (40,), generator=g)
        images = torch.randn(40, 1, 4, 4, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float()
        return TensorDataset(images[:32], labels[:32]), TensorDataset(images[32:], labels[32:])

    def config(epochs):
        return TrainConfig(
            epochs=epochs, batch_size=8, lr=0.05, scheduler="none", ema_decay=0.0, val_fraction=0.25
        )

    def trainer(run_dir, epochs, resume=False, overwrite=False):
        return Trainer(
            {MODEL!r}, config(epochs), datasets=data(), device="cpu", run_dir=run_dir,
            resume=resume, overwrite=overwrite, progress=False, log=None,
        )
    """
)
namespace: dict = {}
exec(SETUP, namespace)  # noqa: S102  (the same definitions as in the subprocess)


def run_killed(run_dir, epochs: int, crash: str, overwrite: bool = False) -> subprocess.CompletedProcess:
    """Train in a subprocess that kills itself at checkpoint point ``crash``."""
    script = SETUP + f"\ntrainer({str(run_dir)!r}, {epochs}, overwrite={overwrite}).fit()\n"
    env = {**os.environ, CRASH_ENV_VAR: crash}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


def test_kill_between_last_and_best_is_repaired_on_resume(tmp_path):
    """Killed after last.pt of an improving epoch, before best.pt: resume rewrites best.pt from last.pt."""
    run = tmp_path / "run"
    run_killed(run, epochs=1, crash="after-replace:last.pt")  # epoch 1 always improves
    assert load_checkpoint(run / "last.pt")["best_epoch"] == 1
    assert not (run / "best.pt").exists()

    summary = namespace["trainer"](run, 1, resume=True).fit()
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["epoch"] == summary["best_epoch"] == last["best_epoch"] == 1
    assert (run / "best.pt").read_bytes() == (run / "last.pt").read_bytes()


def test_kill_after_best_keeps_the_pair_consistent(tmp_path):
    """Killed right after best.pt: both files hold the epoch; resume only tests."""
    run = tmp_path / "run"
    run_killed(run, epochs=1, crash="after-replace:best.pt")
    summary = namespace["trainer"](run, 1, resume=True).fit()
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == summary["best_epoch"] == load_checkpoint(run / "last.pt")["best_epoch"]


def test_stale_best_from_another_epoch_is_replaced(tmp_path):
    """best.pt holding another epoch than last.pt's best (which is last.pt's own) is rewritten."""
    run = tmp_path / "run"
    namespace["trainer"](run, 1).fit()
    state = load_checkpoint(run / "best.pt")
    save_checkpoint({**state, "epoch": 7}, run / "best.pt")
    namespace["trainer"](run, 1, resume=True).fit()
    assert (run / "best.pt").read_bytes() == (run / "last.pt").read_bytes()


def test_lost_best_weights_are_a_clear_error(tmp_path):
    """best.pt gone while last.pt names an earlier best epoch: an error naming best.pt."""
    run = tmp_path / "run"
    namespace["trainer"](run, 1).fit()
    state = load_checkpoint(run / "last.pt")
    save_checkpoint({**state, "epoch": 2}, run / "last.pt")  # pretend epoch 2 did not improve
    (run / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"best\.pt.*is missing.*epoch 1"):
        namespace["trainer"](run, 3, resume=True).fit()


def test_kill_during_save_leaves_a_temporary_that_resume_removes(tmp_path):
    run = tmp_path / "run"
    run_killed(run, epochs=1, crash="before-replace:last.pt")
    stale = [p.name for p in run.iterdir() if p.name.startswith(".last.pt.tmp-")]
    assert len(stale) == 1 and not (run / "last.pt").exists()
    namespace["trainer"](run, 1, resume=True).fit()  # nothing to resume from: starts over
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_later_saves_remove_stale_temporaries(tmp_path):
    path = tmp_path / "last.pt"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".last.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".last.pt.tmp-{os.getpid()}"  # this process: not stale while it runs
    other = tmp_path / ".best.pt.tmp-1"  # another file's temporary is not touched
    other.write_bytes(b"y")
    save_checkpoint({"value": torch.tensor(1)}, path)
    assert not stale.exists() and not live.exists() and other.exists()
    stale.write_bytes(b"x")
    assert remove_stale_temporaries(path) == [stale]


def test_an_earlier_runs_best_is_removed_when_a_run_starts(tmp_path):
    """A fresh run never leaves another run's best.pt beside its own last.pt, and replaces it only
    when told to (overwrite); resuming cannot start from it either."""
    from fastvision.train.trainer import RunExistsError

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint({"epoch": 9}, run / "best.pt")  # an earlier run's weights, without its last.pt
    for resume in (False, True):
        with pytest.raises(RunExistsError, match=r"best\.pt \(epoch 9\)"):
            namespace["trainer"](run, 1, resume=resume)
    assert load_checkpoint(run / "best.pt")["epoch"] == 9
    run_killed(run, epochs=1, crash="after-replace:last.pt", overwrite=True)
    assert not (run / "best.pt").exists()
    summary = namespace["trainer"](run, 1, resume=True).fit()
    assert load_checkpoint(run / "best.pt")["epoch"] == summary["best_epoch"] == 1


# --------------------------------------------------------------------------------- damaged files


@pytest.fixture
def checkpoint(tmp_path):
    run = tmp_path / "run"
    namespace["trainer"](run, 1).fit()
    return run / "last.pt"


def test_flipped_bytes_are_detected(checkpoint):
    data = bytearray(checkpoint.read_bytes())
    middle = HEADER_SIZE + (len(data) - HEADER_SIZE) // 2
    for offset in range(middle, middle + 64):
        data[offset] ^= 0x5A
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt.*SHA-256") as info:
        load_checkpoint(checkpoint)
    assert info.value.path == checkpoint
    with pytest.raises(CheckpointError, match="SHA-256"):
        namespace["trainer"](checkpoint.parent, 2, resume=True).fit()
    with pytest.raises(CheckpointError, match="SHA-256"):
        evaluate_checkpoint(MODEL, checkpoint, dataset=namespace["data"]()[1], device="cpu", progress=False)


def test_a_flip_in_the_digest_itself_is_detected(checkpoint):
    data = bytearray(checkpoint.read_bytes())
    data[HEADER_SIZE - 1] ^= 1
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize(
    "cut, message",
    [
        (0, "empty"),
        (10, "truncated"),
        (HEADER_SIZE - 1, "truncated"),
        (HEADER_SIZE + 100, "truncated"),
        (-1, "truncated"),
    ],
)
def test_truncated_and_empty_files(checkpoint, cut, message):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) + cut if cut < 0 else cut])
    with pytest.raises(CheckpointError, match=rf"last\.pt.*{message}") as info:
        load_checkpoint(checkpoint)
    assert "weights_only" not in str(info.value)


def test_foreign_and_unsafe_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pt.*not a fastvision checkpoint"):
        load_checkpoint(text)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"object": argparse.Namespace(x=1)}, unsafe)  # a bare archive holding an object
    with pytest.raises(CheckpointError, match=r"unsafe\.pt.*not a weights-only checkpoint") as info:
        load_checkpoint(unsafe)
    assert "weights_only=False" not in str(info.value)

    bare = tmp_path / "bare.pt"
    torch.save({"value": torch.tensor(3)}, bare)  # bare archives of plain data still load
    assert load_checkpoint(bare)["value"].item() == 3
    bare.write_bytes(bare.read_bytes()[:-30])
    with pytest.raises(CheckpointError, match=r"bare\.pt"):
        load_checkpoint(bare)

    listing = tmp_path / "list.pt"
    save_checkpoint([1, 2], listing)
    with pytest.raises(CheckpointError, match="expected a mapping"):
        load_checkpoint(listing)


def test_incomplete_checkpoint_names_the_missing_key(checkpoint):
    state = load_checkpoint(checkpoint)
    del state["optimizer"]
    save_checkpoint(state, checkpoint)
    with pytest.raises(CheckpointError, match=r"last\.pt.*missing 'optimizer'"):
        namespace["trainer"](checkpoint.parent, 2, resume=True).fit()
    # Evaluation needs only the weights.
    result = evaluate_checkpoint(
        MODEL, checkpoint, dataset=namespace["data"]()[1], device="cpu", progress=False
    )
    assert result["epoch"] == 1


def test_cli_reports_a_corrupt_checkpoint_without_a_traceback(checkpoint, capsys):
    from fastvision.train.cli import add_subcommands

    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    parser = argparse.ArgumentParser(prog="fastvision")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", MODEL, "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert run_command(args) != 0
    err = capsys.readouterr().err
    assert "last.pt" in err and "truncated" in err and "Traceback" not in err
