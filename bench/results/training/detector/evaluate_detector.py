"""Evaluate the detector runs (runs/detector/*) against the simulator's truth; writes results.json
and figures beside this file.

    OMP_NUM_THREADS=1 .venv/bin/python bench/results/training/detector/evaluate_detector.py

* Regression (test split: the first 500 events of the detector test set, seed 1): the
  standardised MSE, the RMSE of E (MeV) and x, y, z (cm), and the share of targets inside the
  predicted ±1σ / ±2σ. The MSE model has no trained variance: its σ per target is its RMSE on 300
  calibration events of another seed (1001).
* Inpainting (each pretraining run, 100 test events): (a) 60% of the live sensors hidden (fixed masks):
  the count MSE of the model, of the average of visible neighbours, both against the observed count
  and against the true mean; the predicted variance against the true variance, binned by true mean.
  (b) The fixed dead sensors: the model's prediction against their true mean (and a Poisson draw
  of it), next to the neighbour average.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from fastvision.data.detector import DetectorEvents
from fastvision.models import create_model
from fastvision.train.checkpoint import load_checkpoint

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
RUNS = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/detector")
TARGETS = ("energy_MeV", "x_cm", "y_cm", "z_cm")


def load(run: str):
    state = load_checkpoint(RUNS / run / "best.pt", required=("model_name", "task", "model", "ema"))
    model = create_model(state["model_name"])
    model.load_state_dict(state["ema"]["module"] if state["ema"] is not None else state["model"])
    summary = json.loads((RUNS / run / "summary.json").read_text())
    return model.eval(), state, summary


@torch.no_grad()
def predict(model, data: DetectorEvents, batch: int = 100):
    mus, lvs = [], []
    for start in range(0, len(data), batch):
        counts = data.counts[start : start + batch]
        out = model(counts, data.live.expand(len(counts), -1))
        mus.append(out.mu)
        lvs.append(out.log_var)
    return torch.cat(mus), torch.cat(lvs)


def regression(test: DetectorEvents, calib: DetectorEvents) -> dict:
    results = {}
    runs = sorted(p.parent.name for p in RUNS.glob("*/best.pt"))
    for run in runs:
        model, state, summary = load(run)
        if state["task"] != "detector_regression":
            continue
        mu, log_var = predict(model, test)
        target = model.standardize(test.params)
        resid = mu - target
        if model.loss_kind == "mse":
            c_mu, _ = predict(model, calib)
            sigma = (c_mu - model.standardize(calib.params)).square().mean(0).sqrt().expand_as(mu)
            sigma_source = "constant: RMSE on 300 calibration events (seed 1001)"
        else:
            sigma = torch.exp(0.5 * log_var)
            sigma_source = "predicted by the variance network"
        z = resid.abs() / sigma
        phys = resid * model.target_scale
        results[run] = {
            "model": state["model_name"],
            "loss": model.loss_kind,
            "epochs": state["config"]["epochs"],
            "train_samples": state["config"]["train_samples"],
            "init_from": state["config"]["init_from"],
            "wall_time_s": summary.get("wall_time_s"),
            "best_epoch": state.get("best_epoch"),
            "test_events": len(test),
            "mse_standardised": float(resid.square().mean()),
            "rmse": {t: float(phys[:, i].square().mean().sqrt()) for i, t in enumerate(TARGETS)},
            "sigma": sigma_source,
            "within_1sigma": {t: float((z[:, i] <= 1).float().mean()) for i, t in enumerate(TARGETS)},
            "within_2sigma": {t: float((z[:, i] <= 2).float().mean()) for i, t in enumerate(TARGETS)},
            "within_1sigma_all": float((z <= 1).float().mean()),
            "within_2sigma_all": float((z <= 2).float().mean()),
        }
        results[run]["_arrays"] = (resid, sigma)
    return results


@torch.no_grad()
def inpainting(run: str, test: DetectorEvents, n: int = 100) -> dict:
    model, state, summary = load(run)
    det = model.detector
    counts, live = test.counts[:n], test.live.expand(n, -1)
    truth = test.true_mean(list(range(n)))
    hidden = model.random_mask(live, 0.6, generator=torch.Generator().manual_seed(7))
    out = model(counts, live, hidden)
    neigh = det.neighbour_average(counts, live & ~hidden)
    h = hidden
    pred_var = torch.exp(out.log_var)
    true_var = det.true_variance(truth)
    bins = [0, 0.3, 1, 3, 10, 30, 100, math.inf]
    binned = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        sel = h & (truth >= lo) & (truth < hi)
        if sel.sum() == 0:
            continue
        binned.append(
            {
                "true_mean_range": [lo, hi if math.isfinite(hi) else None],
                "sensors": int(sel.sum()),
                "mean_true_variance": float(true_var[sel].mean()),
                "mean_predicted_variance": float(pred_var[sel].mean()),
                "mean_squared_error_vs_observed": float((out.mean - counts)[sel].square().mean()),
                "model_mse_vs_true_mean": float((out.mean - truth)[sel].square().mean()),
                "neighbour_mse_vs_true_mean": float((neigh - truth)[sel].square().mean()),
            }
        )
    masked = {
        "events": n,
        "hidden_sensors": int(h.sum()),
        "model_mse_vs_observed": float((out.mean - counts)[h].square().mean()),
        "neighbour_mse_vs_observed": float((neigh - counts)[h].square().mean()),
        "model_mse_vs_true_mean": float((out.mean - truth)[h].square().mean()),
        "neighbour_mse_vs_true_mean": float((neigh - truth)[h].square().mean()),
        "poisson_floor_vs_observed": float(true_var[h].mean()),
        "by_true_mean": binned,
    }
    # Dead channels: nothing hidden but the dead map itself.
    none = torch.zeros_like(live)
    dead_out = model(counts, live, none)
    dead = ~live
    neigh_dead = det.neighbour_average(counts, live)
    draw = torch.poisson(truth, generator=torch.Generator().manual_seed(11))
    dead_res = {
        "events": n,
        "dead_sensors_per_event": int(dead[0].sum()),
        "model_mse_vs_true_mean": float((dead_out.mean - truth)[dead].square().mean()),
        "neighbour_mse_vs_true_mean": float((neigh_dead - truth)[dead].square().mean()),
        "model_mse_vs_poisson_draw": float((dead_out.mean - draw)[dead].square().mean()),
        "neighbour_mse_vs_poisson_draw": float((neigh_dead - draw)[dead].square().mean()),
        "mean_true_count": float(truth[dead].mean()),
    }
    figure_maps(run, det, counts[0], truth[0], hidden[0], live[0], out.mean[0], neigh[0])
    return {
        "run": run,
        "epochs": state["config"]["epochs"],
        "wall_time_s": summary.get("wall_time_s"),
        "masked_60pct": masked,
        "dead_channels": dead_res,
    }


def figure_maps(run, det, counts, truth, hidden, live, pred, neigh):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inner = det.face_slices["inner"]
    shape = det.faces["inner"].shape
    shown = counts.clone()
    shown[hidden | ~live] = float("nan")
    filled = torch.where(hidden, pred, counts)
    filled_n = torch.where(hidden, neigh, counts)
    panels = [
        ("true mean", truth),
        ("observed", counts),
        ("input (60% hidden)", shown),
        ("model inpainted", filled),
        ("neighbour average", filled_n),
    ]
    vmax = float(torch.quantile(counts[inner], 0.995))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 5.2))
    for ax, (title, values) in zip(axes, panels, strict=True):
        img = values[inner].reshape(shape).numpy()
        im = ax.imshow(img, cmap="viridis", vmin=0, vmax=vmax, origin="lower", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("z column")
    axes[0].set_ylabel("y row (inner face, 93x44)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="photoelectrons")
    fig.suptitle(f"{run}: event 0 of the test split, inner face", fontsize=10)
    fig.savefig(HERE / f"inpainted_inner_face_{run}.png", dpi=90)
    plt.close(fig)


def figure_residuals(reg: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in reg if reg[r]["loss"] != "mse" and reg[r]["epochs"] >= 8]
    if not runs:
        return
    fig, axes = plt.subplots(len(runs), 4, figsize=(14, 3.2 * len(runs)), squeeze=False)
    for row, run in enumerate(runs):
        resid, sigma = reg[run]["_arrays"]
        for i, name in enumerate(TARGETS):
            ax = axes[row, i]
            s, r = sigma[:, i].numpy(), resid[:, i].numpy()
            ax.scatter(s, r, s=3, alpha=0.4)
            top = float(s.max())
            ax.plot([0, top], [0, top], "k--", lw=0.8)
            ax.plot([0, top], [0, -top], "k--", lw=0.8)
            ax.plot([0, top], [0, 2 * top], "r:", lw=0.8)
            ax.plot([0, top], [0, -2 * top], "r:", lw=0.8)
            ax.set_title(f"{run}: {name}", fontsize=9)
            ax.set_xlabel("predicted σ (standardised)")
            ax.set_ylabel("residual (standardised)")
    fig.tight_layout()
    fig.savefig(HERE / "residual_vs_sigma.png", dpi=65)
    plt.close(fig)


def run_log(run: str) -> dict:
    """The command and wall time that run.sh recorded in runs/detector/<run>.log."""
    path = RUNS / f"{run}.log"
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    out = {"command": lines[0].removeprefix("command: ").strip()}
    for line in lines:
        if line.startswith("exit:"):
            out["process_wall_s"] = int(line.split("wall_s:")[1])
    return out


def markdown(results: dict) -> str:
    head = ("run", "model", "loss", "epochs", "init", "train wall s", "MSE (std.)", "RMSE E MeV",
            "RMSE x cm", "RMSE y cm", "RMSE z cm", "in ±1σ", "in ±2σ")  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, r in results["regression"].items():
        rm = r["rmse"]
        init = Path(r["init_from"]).parent.name if r["init_from"] else "scratch"
        cells = (run, r["model"], r["loss"], r["epochs"], init, f"{r['wall_time_s']:.0f}",
                 f"{r['mse_standardised']:.4f}", f"{rm['energy_MeV']:.3f}", f"{rm['x_cm']:.2f}",
                 f"{rm['y_cm']:.2f}", f"{rm['z_cm']:.2f}", f"{100 * r['within_1sigma_all']:.1f}%",
                 f"{100 * r['within_2sigma_all']:.1f}%")  # fmt: skip
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    head = ("run", "epochs", "hidden vs observed: model MSE", "neighbour MSE", "hidden vs true mean: model",
            "neighbour", "dead vs true mean: model", "neighbour")  # fmt: skip
    rows += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, r in results["inpainting"].items():
        m, d = r["masked_60pct"], r["dead_channels"]
        cells = (run, r["epochs"], f"{m['model_mse_vs_observed']:.1f}",
                 f"{m['neighbour_mse_vs_observed']:.1f}", f"{m['model_mse_vs_true_mean']:.1f}",
                 f"{m['neighbour_mse_vs_true_mean']:.1f}",
                 f"{d['model_mse_vs_true_mean']:.2f}", f"{d['neighbour_mse_vs_true_mean']:.2f}")  # fmt: skip
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows) + "\n"


def main():
    test = DetectorEvents(500, seed=1)  # = build_dataset("detector", "test", seed=0)[:500]
    calib = DetectorEvents(300, seed=1001)
    reg = regression(test, calib)
    figure_residuals(reg)
    for value in reg.values():
        value.pop("_arrays")
    results = {"regression": reg}
    pretrain = sorted(p.parent.name for p in RUNS.glob("*/best.pt") if "pretrain" in p.parent.name)
    results["inpainting"] = {run: inpainting(run, test) for run in pretrain}
    for group in ("regression", "inpainting"):
        for run, value in results[group].items():
            value.update(run_log(run))
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "tables.md").write_text(markdown(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
