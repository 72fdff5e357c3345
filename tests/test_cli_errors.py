"""Every ``fastvision`` command turns each class of mistake into one stderr line and one exit code.

The rule: 2 for a bad invocation (the command line must change), 1 for a failure at run time (a
file's content, the data, the machine). Commands run in-process through ``fastvision.cli.main``;
only the closed-pipe case needs a real process.
"""

from __future__ import annotations

import errno
import gzip
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fastvision.cli import EXIT_BROKEN_PIPE, build_parser, main
from fastvision.models import register_model
from fastvision.train import load_checkpoint, save_checkpoint

MODEL = "test_cli_errors_cls"
register_model(MODEL, task="classification", dataset="mnist", description="test")(
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
)
QUICK = ["--device", "cpu", "--epochs", "1", "--batch-size", "32", "--train-samples", "64",
         "--val-samples", "32", "--test-samples", "32", "--no-progress", "--no-viz"]  # fmt: skip
COMMANDS = ("bench", "bench-inference", "profile", "info", "export", "train", "evaluate")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``fastvision ARGV``; argparse's exits count as codes."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, command: str) -> str:
    """The single error line of ``command``; fails on a traceback or several lines."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastvision {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def fails(capsys, code: int, *argv: str) -> str:
    """Run ``fastvision ARGV``, check it exits ``code`` with one error line, and return the line."""
    got, _, err = run(capsys, *argv)
    assert got == code, err
    return error_line(err, argv[0])


@pytest.fixture
def quiet_data(monkeypatch):
    monkeypatch.delenv("FASTVISION_DATA", raising=False)


@pytest.fixture
def trained(tmp_path, capsys, quiet_data):
    """A finished one-epoch run of the tiny model: its run folder."""
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", MODEL, "--run-dir", str(run_dir), *QUICK)
    assert code == 0, err
    return run_dir


# ------------------------------------------------------------------------------ bad invocations: 2


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_is_one_line_and_2(capsys, command):
    positional = ["vit_mnist"] if command in ("profile", "export", "train", "evaluate") else []
    positional += ["--checkpoint", "best.pt"] if command == "evaluate" else []
    line = fails(capsys, 2, command, *positional, "--no-such-option")
    assert "--no-such-option" in line and f"fastvision {command} --help" in line


@pytest.mark.parametrize("command", ["profile", "export", "train", "evaluate"])
def test_unknown_model_is_2_everywhere(capsys, tmp_path, command):
    extra = ["--checkpoint", str(tmp_path / "x.pt")] if command == "evaluate" else []
    line = fails(capsys, 2, command, "no_such_model", *extra)
    assert "unknown model 'no_such_model'" in line


def test_unknown_model_in_bench_inference_is_2(capsys):
    assert "invalid choice" in fails(capsys, 2, "bench-inference", "--model", "no_such_model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--quick"],
        ["bench-inference", "--quick"],
        ["profile", "vit_mnist"],
        ["export", "vit_mnist"],
        ["train", MODEL],
        ["evaluate", MODEL, "--checkpoint", "best.pt"],
    ],
)
def test_device_cuda_without_cuda_is_2(capsys, argv):
    assert "--device cuda: no CUDA device is visible" in fails(capsys, 2, *argv, "--device", "cuda")


def test_version(capsys):
    import fastvision

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith(f"fastvision {fastvision.__version__} (torch ")


def test_help_texts_are_plain():
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:
        texts += [sub.format_help() for sub in action.choices.values()]
    for text in texts:
        assert "``" not in text and "`" not in text, text


@pytest.mark.parametrize("flag", ["--config", "--init-from"])
def test_train_file_flags_naming_a_folder_or_nothing(capsys, tmp_path, flag):
    assert "a folder; name the file" in fails(capsys, 2, "train", MODEL, flag, str(tmp_path), *QUICK)
    missing = str(tmp_path / "missing.yaml")
    assert "no such file" in fails(capsys, 2, "train", MODEL, flag, missing, *QUICK)


def test_checkpoint_flags_naming_a_folder(capsys, tmp_path):
    assert "a folder" in fails(capsys, 2, "evaluate", MODEL, "--checkpoint", str(tmp_path), "--device", "cpu")
    assert "a folder" in fails(capsys, 2, "export", MODEL, "--checkpoint", str(tmp_path), "--device", "cpu")


def test_train_flag_values_are_2_and_name_the_field(capsys, tmp_path):
    assert "lr must be finite" in fails(capsys, 2, "train", MODEL, *QUICK, "--lr", "inf")
    assert "train_samples must be >= 1" in fails(capsys, 2, "train", MODEL, *QUICK, "--train-samples", "0")
    assert not (tmp_path / "runs").exists()


def test_wrong_data_dir_is_reported_before_the_existing_run(capsys, trained, tmp_path):
    missing = str(tmp_path / "no")
    line = fails(capsys, 2, "train", MODEL, "--run-dir", str(trained), "--data-dir", missing, *QUICK)
    assert "--data-dir" in line and "no such folder" in line


def test_existing_run_names_the_cli_flags(capsys, trained):
    line = fails(capsys, 2, "train", MODEL, "--run-dir", str(trained), *QUICK)
    assert "--resume" in line and "--overwrite" in line and "--run-dir" in line
    assert "resume=True" not in line and "last.pt (epoch 1)" in line


def test_profile_out_naming_an_existing_file_is_2(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert "an existing file" in fails(capsys, 2, "profile", "vit_mnist", "--out", str(target))
    assert target.read_text() == "keep me"


def test_export_out_naming_a_folder_is_2(capsys, tmp_path):
    assert "an existing folder" in fails(capsys, 2, "export", "vit_mnist", "--out", str(tmp_path))


# ------------------------------------------------------------------------------ resume: data loss


def test_resume_with_best_but_no_last_refuses_and_says_what_is_there(capsys, trained):
    (trained / "last.pt").unlink()
    best = (trained / "best.pt").read_bytes()
    line = fails(capsys, 2, "train", MODEL, "--run-dir", str(trained), "--resume", *QUICK)
    assert "best.pt (epoch 1)" in line and "no last.pt" in line and "--overwrite" in line
    assert (trained / "best.pt").read_bytes() == best  # untouched


def test_resume_with_a_dangling_last_symlink_refuses(capsys, trained):
    (trained / "last.pt").unlink()
    (trained / "last.pt").symlink_to(trained / "gone.pt")
    best = (trained / "best.pt").read_bytes()
    line = fails(capsys, 1, "train", MODEL, "--run-dir", str(trained), "--resume", *QUICK)
    assert "dangling symbolic link" in line and "last.pt" in line
    assert (trained / "best.pt").read_bytes() == best


def test_last_pt_that_is_a_folder(capsys, trained):
    (trained / "last.pt").unlink()
    (trained / "last.pt").mkdir()
    line = fails(capsys, 1, "train", MODEL, "--run-dir", str(trained), "--resume", *QUICK)
    assert "last.pt" in line and "is a directory" in line


def test_torn_last_metrics_line_is_skipped_on_resume(capsys, trained):
    metrics = trained / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 2, "step": 4, "lr"')  # a write cut short by a kill
    two_epochs = [*QUICK]
    two_epochs[two_epochs.index("--epochs") + 1] = "2"
    code, out, err = run(capsys, "train", MODEL, "--run-dir", str(trained), "--resume", *two_epochs)
    assert code == 0, err
    assert "dropped the torn last line" in out
    epochs = [line for line in metrics.read_text().splitlines() if line]
    assert len(epochs) == 2 and epochs[0] == good.strip()


def test_metrics_rewrite_on_resume_is_atomic(trained, monkeypatch):
    """A kill during the rewrite leaves the old metrics file whole (the rewrite goes through the
    checkpoints' write-and-rename)."""
    from fastvision.train import trainer as trainer_module

    metrics = trained / "metrics.jsonl"
    before = metrics.read_bytes()

    def killed(data, path):
        raise KeyboardInterrupt  # stands in for the kill, between the temporary file and the rename

    monkeypatch.setattr(trainer_module, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer_module.Trainer(
            MODEL, trainer_module.resolve_config(MODEL, epochs=2, train_samples=64, val_samples=32),
            device="cpu", run_dir=trained, resume=True, progress=False, log=None,
        ).fit()  # fmt: skip
    assert metrics.read_bytes() == before


# --------------------------------------------------------------------------- run-time failures: 1


@pytest.mark.parametrize(
    "text, problem",
    [
        ("training:\n  lr: [1, 2\n", "invalid YAML at line"),
        ("epochs: .inf\n", "'epochs' expects int"),
        ("epochs: 1e400\n", "'epochs' expects int"),
        ("1: 2\n", "keys must be option names, got 1 (int)"),
        ("lr: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 8 levels"),
    ],
)
def test_bad_config_files_are_one_line_naming_the_file(capsys, tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = fails(capsys, 1, "train", MODEL, "--config", str(path), *QUICK)
    assert str(path) in line and problem in line


def test_non_utf8_config(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"lr: 0.1\n# caf\xe9\n")
    line = fails(capsys, 1, "train", MODEL, "--config", str(path), *QUICK)
    assert "not UTF-8" in line and "0xe9" in line


def test_yaml_alias_bomb_fails_fast(capsys, tmp_path):
    lines = ["a0: &a0 [xxxxxxxx,xxxxxxxx,xxxxxxxx,xxxxxxxx]"]
    for level in range(1, 9):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    text = "\n".join(lines) + "\n"
    assert len(text) < 420 and text.count("&") == 9  # 8 alias levels: 9**8 * 4 strings if expanded
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    line = fails(capsys, 1, "train", MODEL, "--config", str(path), *QUICK)
    assert time.perf_counter() - start < 5 and "aliases" in line and len(line) < 300


def test_run_folder_under_a_regular_file(capsys, tmp_path, quiet_data):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = fails(capsys, 1, "train", MODEL, "--run-dir", str(blocker / "run"), *QUICK)
    assert f"{blocker} is a file, not a folder" in line


def test_read_only_run_folder(capsys, tmp_path, quiet_data, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anyway: refuse as the kernel would
        import tempfile

        def refused(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run_dir))

        monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    try:
        line = fails(capsys, 1, "train", MODEL, "--run-dir", str(run_dir), *QUICK)
    finally:
        run_dir.chmod(0o755)
    assert f"cannot write in the run folder {run_dir}" in line and "Permission denied" in line


def test_full_disk_is_one_line_and_keeps_the_checkpoint(capsys, trained, monkeypatch):
    from fastvision.train import trainer as trainer_module

    last = (trained / "last.pt").read_bytes()

    def full(data, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(trainer_module, "write_atomic", full)
    line = fails(capsys, 1, "train", MODEL, "--run-dir", str(trained), "--overwrite", *QUICK)
    assert "No space left on device" in line
    assert (trained / "last.pt").read_bytes() == last


def _tamper(path, change) -> None:
    """Rewrite a checkpoint with a valid digest after ``change(state)``."""
    state = load_checkpoint(path)
    change(state)
    save_checkpoint(state, path)


def _wrong_shape(state):
    state["model"]["1.weight"] = torch.zeros(3, 5)
    if state["ema"] is not None:
        state["ema"]["module"]["1.weight"] = torch.zeros(3, 5)


@pytest.mark.parametrize(
    "change, problem",
    [
        (_wrong_shape, "'1.weight' has shape (3, 5), the model's is (10, 784)"),
        (lambda s: s.update(config={"lr": "much"}), "stored training config is unusable"),
        (lambda s: s.update(config=[1, 2]), "'config' is a list"),
        (lambda s: s.update(epoch="1"), "'epoch' must be a non-negative integer, got str '1'"),
    ],
)
def test_evaluate_a_crafted_checkpoint(capsys, trained, change, problem):
    best = trained / "best.pt"
    _tamper(best, change)
    line = fails(capsys, 1, "evaluate", MODEL, "--checkpoint", str(best), "--device", "cpu")
    assert str(best) in line and problem in line


@pytest.mark.parametrize(
    "change, problem",
    [
        (_wrong_shape, "'1.weight' has shape (3, 5)"),
        (lambda s: s.update(rng={"python": "junk"}), "random-number generator state is unusable"),
        (lambda s: s.update(global_step=-3), "'global_step' must be a non-negative integer"),
    ],
)
def test_resume_a_crafted_checkpoint(capsys, trained, change, problem):
    _tamper(trained / "last.pt", change)
    line = fails(capsys, 1, "train", MODEL, "--run-dir", str(trained), "--resume", *QUICK)
    assert "last.pt" in line and problem in line


def test_idx_header_whose_shape_product_wraps(capsys, tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        with gzip.open(data / f"{name}.gz", "wb") as f:
            f.write(huge)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data / f"{name}.gz", "wb") as f:
            f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 1) + b"\x00")
    line = fails(capsys, 1, "train", MODEL, "--data-dir", str(tmp_path), *QUICK)
    assert "train-images-idx3-ubyte.gz" in line
    assert "dimension sizes (4294967295, 4294967295, 4294967295)" in line


# ------------------------------------------------------------------------------ output and pipes


def test_closed_pipe_exits_quietly():
    """``fastvision info --json | head``: the reader is gone before the output is written."""
    script = "import sys; from fastvision.cli import main; sys.exit(main(['info', '--json']))"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write now fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-c", script], stdout=write_end, stderr=subprocess.PIPE, timeout=300
        )
    finally:
        os.close(write_end)
    err = result.stderr.decode()
    assert result.returncode == EXIT_BROKEN_PIPE and err == "", err


def test_export_without_checkpoint_says_random_and_writes_under_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "export", "vit_mnist", "--device", "cpu")
    assert code == 0, err
    assert "weights: random initialisation (no --checkpoint given)" in out
    assert (tmp_path / "runs" / "export" / "vit_mnist.pt2").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_the_no_cuda_runtime_notice_is_dropped_and_nothing_else():
    import logging

    from fastvision.cli import _DropNoCudaRuntimeNotice

    def record(message):
        name = "torch.utils.cpp_extension"
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, ("/x",), None)

    keep = _DropNoCudaRuntimeNotice()
    assert not keep.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'"))
    assert keep.filter(record("Error building extension '%s'"))
