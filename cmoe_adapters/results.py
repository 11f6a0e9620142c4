"""`ContinualResult`: the accuracy matrix of a task stream and everything derived from it.

It is written after every task (``results.json``, a Markdown table, and a PNG heatmap when
matplotlib is installed), and read back to resume a stream.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from . import metrics

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
RESULTS_PNG = "results.png"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        handle.write(text)
        temporary = handle.name
    os.replace(temporary, path)


# how the papers' tables name the summary values (CoIN, MCITlib: Last, Avg, BWT)
_PAPER_NAMES = {
    "final_average": "Last (final_average)",
    "mean_average_accuracy": "Avg (mean_average_accuracy)",
    "bwt": "BWT (bwt)",
}


@dataclass
class ContinualResult:
    """Scores of a continual run: ``accuracy_matrix[i][j]`` is task j's score after task i."""

    tasks: list[str] = field(default_factory=list)
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    oracle_accuracy_matrix: list[list[float | None]] | None = None
    locator_confusion: list[list[int]] | None = None
    task_logs: list[dict[str, Any]] = field(default_factory=list)
    # how each task is scored: a benchmark's metric name (`scorers`), or "custom" (a Task's evaluate=)
    task_metrics: list[str] | None = None

    @property
    def final_average(self) -> float | None:
        return metrics.final_average(self.accuracy_matrix) if self.accuracy_matrix else None

    @property
    def mean_average_accuracy(self) -> float | None:
        return metrics.mean_average_accuracy(self.accuracy_matrix) if self.accuracy_matrix else None

    @property
    def bwt(self) -> float | None:
        return metrics.backward_transfer(self.accuracy_matrix) if self.accuracy_matrix else None

    @property
    def forgetting(self) -> float | None:
        return metrics.forgetting(self.accuracy_matrix) if self.accuracy_matrix else None

    @property
    def locator_accuracy(self) -> float | None:
        return metrics.locator_accuracy(self.locator_confusion) if self.locator_confusion else None

    @property
    def open_set_rate(self) -> float | None:
        """Share of the learnt tasks' eval samples located in none of them (the base model answered).

        None without a locator, or for a confusion matrix saved before the open set (square).
        """
        return metrics.open_set_rate(self.locator_confusion) if self.locator_confusion else None

    @property
    def locator_accuracy_per_task(self) -> dict[str, float | None]:
        """Each task's share of eval samples located to itself (None: no locator or no samples)."""
        counts = self.locator_confusion or []
        shares: dict[str, float | None] = {}
        for i, name in enumerate(self.tasks):
            row = counts[i] if i < len(counts) else []
            shares[name] = row[i] / sum(row) if sum(row) else None
        return shares

    @property
    def oracle_final_average(self) -> float | None:
        if not self.oracle_accuracy_matrix:
            return None
        return metrics.final_average(self.oracle_accuracy_matrix)

    def summary(self) -> dict[str, float | None]:
        return {
            "final_average": self.final_average,
            "mean_average_accuracy": self.mean_average_accuracy,
            "bwt": self.bwt,
            "forgetting": self.forgetting,
            "locator_accuracy": self.locator_accuracy,
            "open_set_rate": self.open_set_rate,
            "oracle_final_average": self.oracle_final_average,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "summary": self.summary(),
            "locator_accuracy_per_task": self.locator_accuracy_per_task if self.locator_confusion else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContinualResult:
        names = {
            "tasks", "accuracy_matrix", "oracle_accuracy_matrix", "locator_confusion", "task_logs",
            "task_metrics",
        }  # fmt: skip
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def load(cls, path: str) -> ContinualResult:
        """Read ``results.json`` from a file or an output directory."""
        if os.path.isdir(path):
            path = os.path.join(path, RESULTS_JSON)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
            from .integrity import AdapterFileError

            raise AdapterFileError(
                f"{path} is damaged ({type(error).__name__}: {error}). It is rewritten whole after every "
                "task; to recover, restore it from a backup, or start a new output_dir: each finished "
                "task's folder next to it loads on its own, and its model card holds the matrix so far."
            ) from None

    def markdown(self) -> str:
        """``results.md``: the accuracy matrix, the summary and the task locator's table."""
        locator = self.locator_markdown()
        return self.accuracy_markdown() + ("\n" + locator if locator else "")

    def accuracy_markdown(self) -> str:
        """The accuracy matrix, each task's metric and the summary as Markdown tables.

        The summary names the papers' columns: Last (the final row's average), Avg (MAA, the mean
        of every row's average) and BWT; the matrix's last row is the per-task final row.
        """
        lines = ["| after \\ on | " + " | ".join(self.tasks) + " |", "|---" * (len(self.tasks) + 1) + "|"]
        for name, row in zip(self.tasks, self.accuracy_matrix, strict=True):
            cells = [_percent(row[j]) if j < len(row) else "" for j in range(len(self.tasks))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if self.task_metrics:
            lines.append("| *metric* | " + " | ".join(f"`{metric}`" for metric in self.task_metrics) + " |")
        lines += ["", "| metric | value |", "|---|---|"]
        for key, value in self.summary().items():
            if value is not None:
                lines.append(f"| {_PAPER_NAMES.get(key, key)} | {100 * value:.1f} |")
        return "\n".join(lines) + "\n"

    def locator_markdown(self) -> str:
        """The locator's confusion after the last task, in % of each task's eval samples; "" without one.

        One row per task: the share located to each task, then to none of them (the base model
        answered those), then the task's locator accuracy; an ``all`` row over every sample, whose
        ``none`` cell is the open-set rate. A matrix saved before the open set has ``-`` there.
        """
        counts = self.locator_confusion
        if not counts or not sum(map(sum, counts)):
            return ""
        tasks = self.tasks[: len(counts)]
        counts = counts[: len(tasks)]
        square = self.open_set_rate is None
        header = ["task \\ located to", *tasks, "none (base model)", "locator accuracy", "samples"]
        lines = [
            "Task locator after the last task: the share (%) of each task's eval samples located to each "
            'task; "none" = located in none of the learnt tasks, so answered by the base model'
            + (' ("-": not recorded, saved before the open set).' if square else "."),
            "",
            "| " + " | ".join(header) + " |",
            "|---" + "|---:" * (len(header) - 1) + "|",
        ]

        def row_cells(row: list[int], correct: int) -> list[str]:
            total = sum(row)
            shares = [_percent(n / total) if total else "-" for n in row[: len(tasks)]]
            none = "-" if square or not total else _percent(row[-1] / total)
            return [*shares, none, _percent(correct / total) if total else "-", str(total)]

        for i, (name, row) in enumerate(zip(tasks, counts, strict=True)):
            lines.append(f"| {name} | " + " | ".join(row_cells(list(row), row[i])) + " |")
        column_sums = [sum(column) for column in zip(*counts, strict=True)]
        correct = sum(row[i] for i, row in enumerate(counts))
        lines.append("| all | " + " | ".join(row_cells(column_sums, correct)) + " |")
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str) -> None:
        """Write ``results.json``, ``results.md`` and, with matplotlib installed, ``results.png``."""
        write_atomically(os.path.join(output_dir, RESULTS_JSON), json.dumps(self.to_dict(), indent=2))
        write_atomically(os.path.join(output_dir, RESULTS_MARKDOWN), self.markdown())
        self.save_heatmap(os.path.join(output_dir, RESULTS_PNG))

    def save_heatmap(self, path: str, title: str = "accuracy after each task") -> bool:
        """A PNG heatmap of the accuracy matrix; returns False when matplotlib is not installed."""
        return save_heatmaps({title: self}, path)


def save_heatmaps(results: dict[str, ContinualResult], path: str) -> bool:
    """One heatmap per titled result, side by side in one PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    size = max(len(result.tasks) for result in results.values())
    figure, all_axes = plt.subplots(
        1, len(results), figsize=(len(results) * (1.2 * size + 2), 1.0 * size + 1.8), squeeze=False
    )
    for column, (axes, (title, result)) in enumerate(zip(all_axes[0], results.items(), strict=True)):
        grid = [[float("nan")] * len(result.tasks) for _ in result.tasks]
        for i, row in enumerate(result.accuracy_matrix):
            for j, value in enumerate(row):
                grid[i][j] = float("nan") if value is None else 100 * value
        image = axes.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        axes.set_xticks(range(len(result.tasks)), result.tasks, rotation=45, ha="right")
        axes.set_yticks(range(len(result.tasks)), result.tasks)
        axes.set_xlabel("evaluated on")
        if column == 0:
            axes.set_ylabel("after training")
        axes.set_title(title)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    color = "black" if value > 60 else "white"  # readable on viridis' light end
                    axes.text(j, i, f"{value:.0f}", ha="center", va="center", color=color)
    figure.colorbar(image, ax=list(all_axes[0]))
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return True
