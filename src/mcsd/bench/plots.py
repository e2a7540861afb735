"""PNG figures of a benchmark summary (matplotlib, no display needed).

- ``speedup.png``               speedup over the reference per method, grouped by dataset;
- ``al_vs_tree_size.png``       mean accepted length against draft nodes per step (the mean:
                                context trees vary per step), one series per proposer and
                                verification rule (mcsd methods and hf-assisted);
- ``acceptance_per_depth.png``  acceptance rate at each depth, one line per speculative method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcsd.bench.methods import Method
from mcsd.bench.report import ALL
from mcsd.bench.runner import reference_method


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "plots need matplotlib: pip install 'mcsd[bench]' (or pass --no-plots)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(
    summary: dict[str, Any], methods: Sequence[Method], out: Path, rules: dict[str, str]
) -> list[Path]:
    """Write every figure into ``out``; ``rules`` maps mcsd method names to their rule."""
    plt = _pyplot()
    paths = [
        _speedup(plt, summary, methods, out / "speedup.png"),
        _al_vs_size(plt, summary, methods, rules, out / "al_vs_tree_size.png"),
        _acceptance(plt, summary, methods, out / "acceptance_per_depth.png"),
    ]
    return [p for p in paths if p is not None]


def replot(directory: Path) -> list[Path]:
    """Draw the figures again from a finished run's ``summary.json`` (e.g. one made with
    ``--no-plots`` on a machine without matplotlib) into the same directory."""
    import json

    from mcsd.bench.methods import parse_method

    path = Path(directory) / "summary.json"
    if not path.is_file():
        raise ValueError(f"--replot: no summary.json in {directory}")
    data = json.loads(path.read_text())
    methods, rules = [], {}
    for described in data["methods"]:  # "tree:4,2,2 (28 nodes, mcss-wor)" or "hf-ar"
        name, _, detail = described.partition(" (")
        method = parse_method(name)
        methods.append(method)
        if method.is_mcsd and detail:
            rules[name] = detail.rstrip(")").split(", ")[-1]
    return plot_all(data["results"], methods, Path(directory), rules)


def _speedup(plt: Any, summary: dict[str, Any], methods: Sequence[Method], path: Path) -> Path:
    names = [m.name for m in methods]
    reference = reference_method(methods)
    key = f"speedup_vs_{reference}" if reference else "tokens_per_s"
    datasets = list(summary)  # the pooled row comes last
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(datasets) * len(names) ** 0.5 + 3), 4.5))
    for i, name in enumerate(names):
        values = [summary[d][name][key] for d in datasets]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(datasets))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(["all (geomean)" if d == ALL else d for d in datasets])
    if reference:
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"speedup over {reference} (tokens/s ratio)")
    else:
        ax.set_ylabel("tokens/s")
    ax.set_title("Speedup per method and dataset")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _al_vs_size(
    plt: Any,
    summary: dict[str, Any],
    methods: Sequence[Method],
    rules: dict[str, str],
    path: Path,
) -> Path | None:
    series: dict[str, list[tuple[int, float, str]]] = {}
    for method in methods:
        row = summary[ALL][method.name]
        if method.is_mcsd:
            label = rules.get(method.name, method.rule or "default")
            if method.proposer != "model":
                label = f"{method.proposer}, {label}"
        elif method.kind == "hf-assisted":
            label = "hf-assisted (chain, max size)"
        else:
            continue
        series.setdefault(label, []).append(
            (row.get("mean_tree_size", row["tree_size"]), row["mean_accepted_length"], method.name)
        )
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for size, al, name in points:
            ax.annotate(name, (size, al), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=4)
    ax.set_xlabel("draft tokens verified per step (tree size)")
    ax.set_ylabel("mean accepted length (tokens per target forward)")
    ax.set_title("Accepted length vs tree size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _acceptance(
    plt: Any, summary: dict[str, Any], methods: Sequence[Method], path: Path
) -> Path | None:
    lines = [
        (m.name, summary[ALL][m.name]["acceptance_per_depth"])
        for m in methods
        if m.is_mcsd or m.kind == "hf-assisted"
    ]
    lines = [(name, rates) for name, rates in lines if rates]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, rates in lines:
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    ax.set_xlabel("depth")
    ax.set_ylabel("acceptance rate (given the parent was accepted)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance per depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
