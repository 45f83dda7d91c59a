"""Optional experiment tracking with Weights & Biases, offline only (``specbeam evaluate --track``).

``wandb`` is imported only here, only when tracking is asked for; runs are written under
``<out>/wandb`` in offline mode (``WANDB_MODE=offline``) and never sent anywhere. Sync them later
with ``wandb sync`` if you want them online.
"""

from __future__ import annotations

import os
from typing import Any


class TrackingUnavailable(RuntimeError):
    """--track was asked for but wandb is not installed."""


class WandbTracker:
    def __init__(self, run) -> None:
        self.run = run

    def log_results(self, results: dict[str, Any]) -> None:
        import wandb

        for name in ("modes", "gamma_sweep", "tree_sweep"):
            rows = results.get(name) or []
            if not rows:
                continue
            keys = sorted({k for r in rows for k in r})
            table = wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])
            self.run.log({name: table})
        for row in results["modes"]:
            self.run.summary[row["label"]] = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        for path in results.get("files", {}).get("plots", []):
            self.run.log({os.path.basename(path): wandb.Image(path)})

    def finish(self) -> None:
        self.run.finish()


def start_tracking(config) -> WandbTracker:
    try:
        import wandb
    except ImportError:
        raise TrackingUnavailable(
            "--track needs Weights & Biases: pip install wandb (or pip install 'specbeam[track]'); "
            "runs are kept offline"
        ) from None
    os.environ["WANDB_MODE"] = "offline"  # never reach the network
    os.environ.setdefault("WANDB_SILENT", "true")
    directory = os.path.join(str(config.out), "wandb")
    os.makedirs(directory, exist_ok=True)
    run = wandb.init(project="specbeam-eval", mode="offline", dir=directory, config=config.to_json())
    return WandbTracker(run)
