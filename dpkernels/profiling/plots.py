"""The plots of a profile run (matplotlib figures without pyplot, PNG), from the experiments' JSON records.

    memory_breakdown.png   per (model, T, B): the single step's peak by component, one bar per mode
    memory_timeline.png    per (model, T, B): measured memory at every snapshot of the run, per mode
    seq_scaling.png        time per step and run peak memory against sequence length, per model and mode
    tradeoff.png           run peak memory against time per step, one point per experiment
    overhead.png           time and memory as a multiple of nondp's, per mode and (model, T, B)

Only experiments with status "ok" are drawn.  Memory in MB (2**20 bytes), time in ms per optimizer step
(the median of the timed steps; the overhead plot's error bars span the fastest to the slowest step).
Every bar is labelled with its value and the y axis leaves room above the tallest; each mode has its
own colour, marker and line style, and lines that coincide stay visible: hollow markers of decreasing
size, and on the timeline a small horizontal offset per mode.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from matplotlib.figure import Figure

from .breakdown import COMPONENTS, PHASES
from .report import SHORT, baselines, median_ms, write_atomic

COLORS = {
    "parameters": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer_state": "#55a868",
    "batch": "#8c8c8c",
    "autograd_activations": "#c44e52",
    "clipping_cache": "#8172b3",
    "norm_buffers": "#937860",
    "temporaries": "#da8bc3",
    "unattributed": "#cccccc",
}

LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LEGEND_FONT = 9
HEADROOM = 1.15  # the y axis of a bar plot ends this far above its tallest bar


def mode_styles(modes: List[str]) -> Dict[str, dict]:
    """Colour, marker, line style and z-order per mode: the first modes get the largest hollow markers
    and are drawn lowest, so a later mode on the same points shows inside an earlier one's marker."""
    n = max(len(modes), 1)
    return {
        mode: {
            "color": f"C{i % 10}",
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "markersize": 11 - 6 * i / n,
            "markerfacecolor": "none",
            "markeredgewidth": 1.5,
            "zorder": 2 + i,
        }
        for i, mode in enumerate(modes)
    }


def by_group(records: List[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in records:
        groups[r["config"]["group"]].append(r)
    return dict(groups)


def grid(n: int, width: float = 5.0, height: float = 3.8):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def bottom_legend(fig, ax, panels: int) -> float:
    """One legend for every panel, under them; returns the figure fraction it takes."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = max(1, min(len(labels), 4 * min(panels, 3)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=LEGEND_FONT, frameon=False)
    return (0.27 * math.ceil(len(labels) / ncol) + 0.1) / fig.get_figheight()


def label_bars(ax, xs: List[float], values: List[float], tops: Optional[List[float]] = None, fontsize: float = 7.5) -> None:
    """Write each bar's value above it (above ``tops``: its error bar, if any) and end the y axis
    HEADROOM above the highest, so that no bar is cut."""
    tops = values if tops is None else tops
    for x, value, top in zip(xs, values, tops):
        ax.annotate(f"{value:.2f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=fontsize)
    ax.set_ylim(0, max(ax.get_ylim()[1] if ax.get_autoscaley_on() is False else 0.0, HEADROOM * max(tops, default=1.0)))
    ax.set_autoscaley_on(False)


def save(fig, path: Path, legend_space: float = 0.0) -> None:
    """Write the figure as PNG (atomically); ``legend_space``: figure fraction kept free at the bottom."""
    buffer = io.BytesIO()
    fig.tight_layout(rect=(0, legend_space, 1, 1))
    fig.savefig(buffer, format="png", dpi=90)
    write_atomic(path, buffer.getvalue())


def plot_breakdown(groups: Dict[str, List[dict]], path: Path) -> None:
    fig, axes = grid(len(groups))
    for ax, (group, records) in zip(axes, groups.items()):
        modes = [r["config"]["mode"] for r in records]
        xs = list(range(len(records)))
        bottom = [0.0] * len(records)
        for part in (*COMPONENTS, "temporaries", "unattributed"):
            values = [max(0.0, r["breakdown"]["components_mb"][part] if part in COMPONENTS else r["breakdown"][f"{part}_mb"]) for r in records]
            ax.bar(xs, values, bottom=bottom, color=COLORS[part], label=SHORT.get(part, part))
            bottom = [b + v for b, v in zip(bottom, values)]
        label_bars(ax, xs, bottom)
        ax.set_xticks(xs, modes, rotation=30, ha="right")
        ax.set_title(f"{group}: single-step peak")
        ax.set_ylabel("MB")
    save(fig, path, legend_space=bottom_legend(fig, axes[0], len(groups)))


def timeline_positions(records: List[dict]) -> Dict[tuple, int]:
    """A shared x position for every (step, micro-batch, phase) seen in any mode's run."""
    keys = {(s["step"], s["micro_batch"], PHASES.index(s["phase"])) for r in records for s in r["run"]["snapshots"]}
    return {key: i for i, key in enumerate(sorted(keys))}


def plot_timeline(groups: Dict[str, List[dict]], styles: Dict[str, dict], path: Path) -> None:
    fig, axes = grid(len(groups), width=6.0)
    for ax, (group, records) in zip(axes, groups.items()):
        x_of = timeline_positions(records)
        for i, r in enumerate(records):
            snaps = r["run"]["snapshots"]
            offset = 0.45 * (i - (len(records) - 1) / 2) / max(len(records), 1)  # coinciding lines side by side
            xs = [x_of[(s["step"], s["micro_batch"], PHASES.index(s["phase"]))] + offset for s in snaps]
            mode = r["config"]["mode"]
            ax.plot(xs, [s["total_mb"] for s in snaps], label=mode, **{**styles[mode], "markersize": styles[mode]["markersize"] * 0.7})
        starts = [x for (step, micro, phase), x in x_of.items() if micro == 0 and phase == 0]
        ax.set_xticks(starts, [f"step {i}" for i in range(len(starts))])
        ax.set_title(f"{group}: memory at each phase of the run")
        ax.set_ylabel("MB")
    save(fig, path, legend_space=bottom_legend(fig, axes[0], len(groups)))


def plot_seq_scaling(records: List[dict], styles: Dict[str, dict], path: Path) -> None:
    """Per (model, B) family and mode, one line; a family's lines share a line style when there are several families."""
    fig = Figure(figsize=(11, 4.2))
    ax_t, ax_m = fig.subplots(1, 2)
    lines: Dict[tuple, List[dict]] = defaultdict(list)
    for r in records:
        c = r["config"]
        lines[(c["model"], c["batch"], c["mode"])].append(r)
    families = list(dict.fromkeys((model, B) for model, B, _ in lines))
    for (model, B, mode), rs in lines.items():
        rs = sorted(rs, key=lambda r: r["config"]["tokens"])
        T = [r["config"]["tokens"] for r in rs]
        style = dict(styles[mode])
        if len(families) > 1:
            style["linestyle"] = LINESTYLES[families.index((model, B)) % len(LINESTYLES)]
        label = mode if len(families) == 1 else f"{model} B{B} {mode}"
        ax_t.plot(T, [median_ms(r) for r in rs], label=label, **style)
        ax_m.plot(T, [r["peak_memory_mb"] for r in rs], **style)
    for ax, what in ((ax_t, "ms per step (median)"), (ax_m, "run peak MB")):
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(what)
        ax.set_title(f"{what} against sequence length")
    save(fig, path, legend_space=bottom_legend(fig, ax_t, 2))


def plot_tradeoff(records: List[dict], styles: Dict[str, dict], path: Path) -> None:
    """Colour and marker size by mode (hollow, so coinciding points stay visible), a fill pattern by group."""
    fig = Figure(figsize=(7, 5.5))
    ax = fig.subplots()
    groups = list(dict.fromkeys(r["config"]["group"] for r in records))
    for r in records:
        st = styles[r["config"]["mode"]]
        marker = MARKERS[groups.index(r["config"]["group"]) % len(MARKERS)]
        ax.plot([median_ms(r)], [r["peak_memory_mb"]], linestyle="none", marker=marker, color=st["color"],
                markersize=st["markersize"], markerfacecolor="none", markeredgewidth=1.5, zorder=st["zorder"])
    for mode, st in styles.items():
        ax.plot([], [], linestyle="none", marker="o", color=st["color"], markersize=st["markersize"], markerfacecolor="none", label=mode)
    for i, group in enumerate(groups):
        ax.plot([], [], linestyle="none", color="gray", marker=MARKERS[i % len(MARKERS)], markerfacecolor="none", label=group)
    ax.set_xlabel("ms per step (median)")
    ax.set_ylabel("run peak MB")
    ax.set_title("time / memory trade-off (lower left is better)")
    save(fig, path, legend_space=bottom_legend(fig, ax, 1))


def plot_overhead(records: List[dict], path: Path) -> None:
    """Bars: the median time and the run peak as multiples of nondp's; time's error bar spans the
    slowest and the fastest step of the mode against nondp's median."""
    base = baselines(records)
    dp = [r for r in records if r["config"]["mode"] != "nondp" and r["config"]["group"] in base]
    modes = list(dict.fromkeys(r["config"]["mode"] for r in dp))
    groups = list(dict.fromkeys(r["config"]["group"] for r in dp))
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(groups), 1)
    for j, group in enumerate(groups):
        rs = {r["config"]["mode"]: r for r in dp if r["config"]["group"] == group}
        xs = [i + j * width for i, m in enumerate(modes) if m in rs]
        t_base = median_ms(base[group])
        times = [median_ms(rs[m]) / t_base for m in modes if m in rs]
        low = [t - min(rs[m]["step_times_ms"]) / t_base for t, m in zip(times, (m for m in modes if m in rs))]
        high = [max(rs[m]["step_times_ms"]) / t_base - t for t, m in zip(times, (m for m in modes if m in rs))]
        memory = [rs[m]["peak_memory_mb"] / base[group]["peak_memory_mb"] for m in modes if m in rs]
        axes[0].bar(xs, times, width, yerr=[low, high], capsize=2, error_kw={"linewidth": 0.8}, color=f"C{j % 10}", label=group)
        axes[1].bar(xs, memory, width, color=f"C{j % 10}")
        size = 6.5 if len(groups) > 2 else 7.5
        label_bars(axes[0], xs, times, [t + h for t, h in zip(times, high)], fontsize=size)
        label_bars(axes[1], xs, memory, fontsize=size)
    for ax, what in zip(axes, ("time (median)", "run peak memory")):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(modes))], modes, rotation=30, ha="right")
        ax.set_ylabel(f"{what} (x nondp)")
        ax.set_title(f"{what} as a multiple of nondp's")
    save(fig, path, legend_space=bottom_legend(fig, axes[0], 2))


def write_plots(records: List[dict], folder: Path) -> List[Path]:
    """Draw every plot of the module doc into ``folder``; returns the files written."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return []
    groups = by_group(ok)
    styles = mode_styles(list(dict.fromkeys(r["config"]["mode"] for r in ok)))
    paths = []
    for name, draw in (
        ("memory_breakdown.png", lambda p: plot_breakdown(groups, p)),
        ("memory_timeline.png", lambda p: plot_timeline(groups, styles, p)),
        ("seq_scaling.png", lambda p: plot_seq_scaling(ok, styles, p)),
        ("tradeoff.png", lambda p: plot_tradeoff(ok, styles, p)),
        ("overhead.png", lambda p: plot_overhead(ok, p)),
    ):
        draw(folder / name)
        paths.append(folder / name)
    return paths
