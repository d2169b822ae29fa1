"""A tiny BAKE search from Python, its ranked table, and validation accuracy against T,
omega and lambda.

    python examples/search_api.py [OUT_DIR]

Four trials on scikit-learn's digits (two epochs, 300 training images): a minute or two on
a laptop. The search is stored in OUT_DIR/ray_results and logged to OUT_DIR/mlflow.db;
the figure is OUT_DIR/val_acc_vs_bake.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script writes the figure to a file; no display needed
import matplotlib.pyplot as plt

from bake_ray.api import tune

REPO = Path(__file__).resolve().parents[1]
PANELS = {"bake.temperature": "T", "bake.omega": "omega", "bake.loss_weight": "lambda"}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = tune(
        REPO / "search_spaces" / "default.yaml",
        overrides={
            "budget.num_samples": 4,
            "budget.max_concurrent": 1,
            "base.epochs": 2,
            "base.data.train_subset": 300,
            "scheduler.grace_period": 1,
        },
        storage=str(out / "ray_results"),
        tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db",
        name="search-api-example",
    )
    trials = result.trials
    columns = ["rank", "trial_id", *PANELS, "best_val_acc", "val_lo", "val_hi", "status"]
    print(trials[columns].to_string(index=False))
    print(f"winner: {result.best_trial}; {result.separability}")
    print(f"MLflow parent run: {result.parent_run_id}")

    acc = trials["best_val_acc"]
    interval = [acc - trials["val_lo"], trials["val_hi"] - acc]  # the Wilson interval's arms
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), sharey=True)
    for ax, (key, label) in zip(axes, PANELS.items(), strict=True):
        ax.errorbar(trials[key], acc, yerr=interval, fmt="o", capsize=3)
        ax.set(xlabel=label, title=f"best val acc vs {label}")
        if key == "bake.loss_weight":
            ax.set_xscale("log")  # the space samples lambda log-uniformly
    axes[0].set_ylabel("best validation accuracy (95% interval)")
    fig.tight_layout()
    figure = out / "val_acc_vs_bake.png"
    fig.savefig(figure, dpi=110)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("search_api_example"))
