"""``fastvision train`` / ``fastvision evaluate`` sub-commands (wired in by ``fastvision.cli``, which
turns what they raise into one error line and the exit status: ``UsageError`` 2, a failure 1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastvision.train.config import AMP_MODES, OPTIMIZERS, SCHEDULERS, TASK_NAMES


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate`` to an argparse ``add_subparsers()`` object."""
    train = subparsers.add_parser(
        "train",
        help="train a registered model",
        description="Train MODEL. Config precedence: model defaults < --config FILE < command-line flags.",
    )
    from fastvision.cli import registered_model

    train.add_argument("model", metavar="MODEL", type=registered_model, help="registered model name")
    train.add_argument("--config", metavar="FILE", help="YAML training config (flat or under 'training:')")
    _add_data_device(train)
    train.add_argument("--run-dir", metavar="DIR", help="output folder (default: runs/MODEL)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/last.pt (a folder without one starts afresh only when it holds no run)",
    )
    train.add_argument("--overwrite", action="store_true", help="start over in a run dir that holds a run")
    train.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    train.add_argument(
        "--no-viz",
        action="store_true",
        help="skip the per-validation display (braille digit samples; denoising PNGs in RUN_DIR/figures)",
    )
    overrides = train.add_argument_group("config overrides")
    overrides.add_argument("--epochs", type=int)
    overrides.add_argument("--batch-size", type=int)
    overrides.add_argument("--grad-accum-steps", type=int)
    overrides.add_argument("--lr", type=float)
    overrides.add_argument("--weight-decay", type=float)
    overrides.add_argument("--optimizer", choices=OPTIMIZERS)
    overrides.add_argument("--scheduler", choices=SCHEDULERS)
    overrides.add_argument("--warmup-epochs", type=float)
    overrides.add_argument("--ema-decay", type=float, help="0 disables EMA")
    overrides.add_argument("--amp", choices=AMP_MODES)
    overrides.add_argument("--grad-clip", type=float, help="max gradient norm; 0 disables")
    overrides.add_argument("--seed", type=int)
    overrides.add_argument("--num-workers", type=int)
    overrides.add_argument("--train-samples", type=int, help="cap the training samples (quick runs)")
    overrides.add_argument("--val-samples", type=int, help="cap the validation samples")
    overrides.add_argument("--test-samples", type=int, help="cap the test samples")
    overrides.add_argument(
        "--shift-augment", type=int, help="randomly translate training images by up to N pixels"
    )
    overrides.add_argument(
        "--shift-tiles", type=int, help="shift each cell of an NxN grid on its own (2: each digit of a grid)"
    )
    overrides.add_argument(
        "--redraw-each-epoch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw fresh digit-grid layouts every epoch, from seed and epoch (--no-redraw-each-epoch: fixed)",
    )
    overrides.add_argument("--noise-sigma", type=float, help="denoise task noise level")
    overrides.add_argument(
        "--task", choices=TASK_NAMES, help="another task the model serves (fcmae: masked pretraining)"
    )
    overrides.add_argument(
        "--init-from", metavar="CKPT", help="start from a checkpoint's weights (e.g. an fcmae run's best.pt)"
    )
    overrides.add_argument("--mask-ratio", type=float, help="fcmae: fraction of the patches masked")
    overrides.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fcmae: per-patch normalised pixel targets",
    )
    overrides.add_argument(
        "--query-samples", type=int, help="inr: random pixels decoded per training image (default: all)"
    )
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser("evaluate", help="test-split metrics of a checkpoint")
    evaluate.add_argument("model", metavar="MODEL", type=registered_model, help="registered model name")
    evaluate.add_argument("--checkpoint", required=True, metavar="PATH", help="best.pt or last.pt of a run")
    _add_data_device(evaluate)
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--test-samples", type=int)
    evaluate.add_argument("--no-ema", action="store_true", help="use the live weights, not the EMA copy")
    evaluate.add_argument(
        "--figures",
        metavar="DIR",
        help="also write attention overlays and PCA/t-SNE embedding plots (digit readers) to DIR",
    )
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=run_evaluate)


def _add_data_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="dataset root (default: $FASTVISION_DATA, else embedded stand-in data)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


CONFIG_FLAGS = (
    "epochs",
    "batch_size",
    "grad_accum_steps",
    "lr",
    "weight_decay",
    "optimizer",
    "scheduler",
    "warmup_epochs",
    "ema_decay",
    "amp",
    "grad_clip",
    "seed",
    "num_workers",
    "train_samples",
    "val_samples",
    "test_samples",
    "shift_augment",
    "shift_tiles",
    "redraw_each_epoch",
    "noise_sigma",
    "task",
    "init_from",
    "mask_ratio",
    "norm_pix_loss",
    "query_samples",
)


def _validation_display(model_name: str, run_dir: str | None, task: str | None = None):
    """The per-validation display for a model's task: braille digit samples in the terminal for the
    digit tasks, noisy/denoised/clean PNGs under RUN_DIR/figures for the denoiser, none for others."""
    from fastvision.models import get_model_spec

    task = task or get_model_spec(model_name).task
    if task == "denoise":
        from fastvision.viz.denoise import denoising_figure_hook

        return denoising_figure_hook(Path(run_dir or Path("runs") / model_name) / "figures")
    if task in ("classification", "digit_sequence"):
        from fastvision.viz.digits import show_validation_samples

        return show_validation_samples
    return None


def config_from_args(args: argparse.Namespace):
    """The run's ``TrainConfig``: model defaults < ``--config`` file < command-line overrides.

    A value refused in the flags themselves is a ``UsageError`` (exit 2); a problem of the config
    file (or of the file and the flags together) stays a ``ValueError`` naming it (exit 1).
    """
    from fastvision.cli import UsageError
    from fastvision.train.trainer import resolve_config

    flags = {name: getattr(args, name) for name in CONFIG_FLAGS}
    try:
        return resolve_config(args.model, args.config, **flags)
    except ValueError as error:
        if args.config is None:
            raise UsageError(str(error)) from None
        try:
            resolve_config(args.model, None, **flags)
        except ValueError as flag_error:
            raise UsageError(str(flag_error)) from None
        raise


def _check_paths(args: argparse.Namespace) -> None:
    """Paths the command line names that cannot work, before any work starts (usage errors)."""
    from fastvision.cli import existing_file, existing_folder

    existing_folder(args.data_dir, "--data-dir")
    for flag, name in (("--config", "config"), ("--checkpoint", "checkpoint"), ("--init-from", "init_from")):
        existing_file(getattr(args, name, None), flag)


def run_train(args: argparse.Namespace) -> int:
    from fastvision.cli import UsageError
    from fastvision.train.trainer import RunExistsError, train

    _check_paths(args)
    cfg = config_from_args(args)
    try:
        summary = train(
            args.model,
            cfg,
            data_dir=args.data_dir,
            device=args.device,
            run_dir=args.run_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            on_validation=None if args.no_viz else _validation_display(args.model, args.run_dir, cfg.task),
        )
    except RunExistsError as error:
        raise UsageError(error.describe(cli=True)) from None
    shown = ("model", "dataset", "test_metrics", "wall_time_s", "run_dir")
    print(json.dumps({key: summary[key] for key in shown}, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from fastvision.train.trainer import evaluate_checkpoint

    _check_paths(args)
    if args.batch_size is not None and args.batch_size < 1:
        from fastvision.cli import UsageError

        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = evaluate_checkpoint(
        args.model,
        args.checkpoint,
        data_dir=args.data_dir,
        device=args.device,
        use_ema=not args.no_ema,
        batch_size=args.batch_size,
        test_samples=args.test_samples,
        progress=not args.no_progress,
        figures_dir=args.figures,
    )
    print(json.dumps(result, indent=2))
    return 0
