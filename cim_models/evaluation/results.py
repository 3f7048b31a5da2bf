"""The results file every evaluation command writes, and its rows for a model card.

One JSON object per run (``knn_results.json``, ``linear_probe_results.json``,
``finetune_results.json``), format ``cim-eval-results/1``:

```
{
  "format": "cim-eval-results/1",
  "task": "knn" | "linear_probe" | "finetune",
  "protocol": "kNN (k=20, T=0.07)",              # one line, for people and the card's table
  "model": "runs/tiny",                          # the --model_name_or_path as given
  "model_path": "/abs/runs/tiny",                # what it resolved to (folder, or Hub id@revision)
  "dataset": {"name": "synthetic-shapes",        # the card's dataset id (--dataset_label overrides)
              "source": "built-in" | folder | Hub dataset, "train_split": "train",
              "split": "validation", "num_classes": 10},
  "metrics": {"top1": 93.1, "top5": 99.6},      # accuracies in PERCENT, on dataset.split
  "recipe": {...},                               # every hyper-parameter that produced the numbers
  "num_train_samples": 3000, "num_eval_samples": 1000,
  "runtime_seconds": 12.3,
  "date": "2025-01-01T12:00:00+00:00",           # UTC, when the run finished
  "cim_models_version": "0.1.0"
}
```

``card_results`` turns one such file into rows of ``cim-export --card-data``'s
``results`` list, value for value.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORMAT = "cim-eval-results/1"
TASKS = ("knn", "linear_probe", "finetune")
RESULTS_FILES = {
    "knn": "knn_results.json",
    "linear_probe": "linear_probe_results.json",
    "finetune": "finetune_results.json",
}
METRIC_NAMES = {"top1": "Top-1 accuracy (%)", "top5": "Top-5 accuracy (%)"}
_COMMANDS = {"knn": "cim-eval knn", "linear_probe": "cim-eval linear", "finetune": "cim-finetune"}


def build_results(
    task: str,
    protocol: str,
    model: str,
    model_path: str,
    dataset: dict[str, Any],
    metrics: dict[str, float],
    recipe: dict[str, Any],
    num_train_samples: int,
    num_eval_samples: int,
    runtime_seconds: float,
) -> dict[str, Any]:
    """One results object; ``metrics`` are fractions in [0, 1], stored as percentages."""
    from .. import __version__

    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    if not all(0.0 <= v <= 1.0 for v in metrics.values()):
        raise ValueError(f"metrics must be fractions in [0, 1], got {metrics}.")
    percent = {k: round(100.0 * v, 4) for k, v in metrics.items()}
    return {
        "format": FORMAT,
        "task": task,
        "protocol": protocol,
        "model": model,
        "model_path": model_path,
        "dataset": dataset,
        "metrics": percent,
        "recipe": recipe,
        "num_train_samples": num_train_samples,
        "num_eval_samples": num_eval_samples,
        "runtime_seconds": round(runtime_seconds, 2),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cim_models_version": __version__,
    }


def write_results(results: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write ``results`` to ``output_dir/<task>_results.json`` (atomically); return the path."""
    path = Path(output_dir) / RESULTS_FILES[results["task"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(results, indent=2, default=str) + "\n")
    partial.replace(path)
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results file, checked for the fields a model card needs."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable results JSON file ({err}).") from err
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        found = results.get("format") if isinstance(results, dict) else type(results).__name__
        raise ValueError(
            f"{path} has format {found!r}, not {FORMAT!r}: pass a file written by cim-eval or "
            "cim-finetune."
        )
    missing = [k for k in ("task", "protocol", "dataset", "metrics") if k not in results]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by cim-eval or cim-finetune.")
    return results


def card_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the card data's ``results`` (one per metric), with exactly the file's numbers."""
    dataset = results["dataset"]
    source = f"{_COMMANDS[results['task']]}, {results.get('date', '')[:10]}".rstrip(", ")
    return [
        {
            "task": "image-classification",
            "protocol": results["protocol"],
            "dataset": dataset["name"],
            "dataset_name": dataset["name"],
            "split": dataset.get("split"),
            "metric": "accuracy",
            "metric_name": METRIC_NAMES.get(name, name),
            "value": value,
            "source": source,
        }
        for name, value in results["metrics"].items()
    ]
