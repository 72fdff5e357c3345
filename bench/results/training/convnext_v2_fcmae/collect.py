"""Collect the convnext_v2_fcmae runs (commands.sh, extras.sh) into this folder: each run's summary.json and
metrics.jsonl under <run>/, and one results.json + RESULTS.md table of what finished.

    python bench/results/training/convnext_v2_fcmae/collect.py [RUNS_DIR]   # default runs/convnext
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
MODELS = ("convnext_v2_fcmae", "convnext_v2_fcmae_nogrn")
STAGES = (
    "pretrain", "finetune", "scratch", "scratch2", "finetune_seed1", "scratch2_seed1", "scratch_seed1"
)


def main() -> int:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/convnext")
    table: dict[str, dict] = {}
    for model in MODELS:
        for stage in STAGES:
            source = runs / f"{model}_{stage}"
            if not (source / "summary.json").exists():
                if (source / "metrics.jsonl").exists():  # stopped early: its completed epochs only
                    target = HERE / f"{model}_{stage}_unfinished"
                    target.mkdir(exist_ok=True)
                    shutil.copy2(source / "metrics.jsonl", target / "metrics.jsonl")
                    lines = (source / "metrics.jsonl").read_text().splitlines()
                    table[f"{model}_{stage}_unfinished"] = {
                        "model": model,
                        "stage": stage,
                        "completed_epochs": [json.loads(line) for line in lines if line],
                    }
                continue
            target = HERE / f"{model}_{stage}"
            target.mkdir(exist_ok=True)
            for name in ("summary.json", "metrics.jsonl"):
                shutil.copy2(source / name, target / name)
            summary = json.loads((source / "summary.json").read_text())
            lines = (source / "metrics.jsonl").read_text().splitlines()
            metrics = [json.loads(line) for line in lines if line]
            table[f"{model}_{stage}"] = {
                "model": model,
                "stage": stage,
                "epochs": summary["epochs"],
                "best_epoch": summary["best_epoch"],
                "samples": summary["samples"],
                "wall_time_s": summary["wall_time_s"],
                "epoch_times_s": [round(m["epoch_time_s"], 1) for m in metrics],
                "test_metrics": summary["test_metrics"],
                "num_parameters": summary["num_parameters"],
                "command_line": summary["command_line"],
                "init_from": summary["config"].get("init_from"),
            }
        inpainting = RESULTS / f"{model}_inpainting" / "inpainting.json"
        if inpainting.exists():
            table[f"{model}_inpainting"] = json.loads(inpainting.read_text())
    (HERE / "results.json").write_text(json.dumps(table, indent=2) + "\n")

    lines = [
        "# convnext_v2_fcmae on Fashion-MNIST (CPU)",
        "",
        "Produced by `commands.sh` (every command below is in it) and collected by `collect.py`.",
        "10,000 training images, 2,000 held-out validation images, the 10,000 test images.",
        "",
        "| run | epochs | wall time | test result |",
        "|---|---|---|---|",
    ]
    for key, row in table.items():
        if key.endswith("_inpainting"):
            continue
        if key.endswith("_unfinished"):
            done = row["completed_epochs"]
            last = done[-1] if done else {}
            shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_"))
            shown = f"last validation: {shown or 'none'}"
            lines.append(f"| {key} | {len(done)} completed (stopped) | - | {shown} |")
            continue
        metrics = row["test_metrics"]
        if row["stage"] == "pretrain":
            result = (
                f"masked-pixel MSE {metrics['masked_mse']:.4f} (mean fill {metrics['mean_fill_mse']:.4f})"
            )
        else:
            result = f"accuracy {100 * metrics['accuracy']:.2f} %"
        lines.append(f"| {key} | {row['epochs']} | {row['wall_time_s'] / 60:.1f} min | {result} |")
    for model in MODELS:
        entry = table.get(f"{model}_inpainting")
        if entry is None:
            continue
        scores = entry["masked_pixel_mse"]
        lines += [
            "",
            f"Inpainting, {model} (best pretraining checkpoint, {entry['test_images']} test images, "
            f"mask ratio {entry['mask_ratio']}, seed {entry['seed']}; MSE on masked pixels, mean ± s.e.):",
            "",
            "| method | masked-pixel MSE |",
            "|---|---|",
        ]
        for method, score in scores.items():
            lines.append(f"| {method} | {score['mean']:.4f} ± {score['stderr']:.4f} |")
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
