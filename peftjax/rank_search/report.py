"""``report.md`` and PNG plots of a rank search, from its JSON payload alone.

Everything here reads ``rank_search.json``'s payload (``sweep.run_rank_search``
returns it), so a report can be rewritten from saved results:
``write_report(json.loads(path.read_text()), folder)``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

PLOTS_DIR = "plots"
REPORT_FILE = "report.md"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _bytes(value: int | None) -> str:
    return "null (CPU)" if value is None else f"{value / 2**20:,.0f} MiB"


def _by_target_set(summary: Sequence[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for entry in summary:
        grouped.setdefault(entry["target_set"], []).append(entry)
    return grouped


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------


def plot_metric_vs_rank(payload: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for target_set, entries in _by_target_set(payload["summary"]).items():
        ranks = [e["rank"] for e in entries]
        ax.errorbar(ranks, [e["mean"] for e in entries], yerr=[e["std"] for e in entries], marker="o", capsize=3,
                    label=target_set)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(f"{payload['sweep']['metric']} (mean ± std over seeds)")
    ax.set_title("Metric vs rank")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(payload: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for target_set, entries in _by_target_set(payload["summary"]).items():
        xs, ys = [e["trainable_params"] for e in entries], [e["mean"] for e in entries]
        ax.scatter(xs, ys, label=target_set)
        for e in entries:
            ax.annotate(f"r{e['rank']}", (e["trainable_params"], e["mean"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = payload["pareto"]
    if front:
        ax.step([p["trainable_params"] for p in front], [p["mean"] for p in front], where="post", color="black",
                linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(payload["sweep"]["metric"])
    ax.set_title("Trainable parameters vs metric")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(payload: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    spectra = payload["spectra"]
    fig, axes = plt.subplots(1, max(len(spectra), 1), figsize=(5 * max(len(spectra), 1), 3.8), squeeze=False)
    for ax, (target_set, by_rank) in zip(axes[0], spectra.items()):
        for rank, values in by_rank.items():
            ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=f"r={rank}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("sigma_i / sigma_1 of Delta W")
        ax.set_title(f"{target_set}: mean over modules and seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_similarity(payload: dict, path: pathlib.Path) -> bool:
    grids = payload["similarity"].get("grid") or {}
    if not grids:
        return False
    plt = _pyplot()
    small, large = payload["similarity"]["grid_ranks"]
    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 3.2), squeeze=False)
    for ax, (target_set, grid) in zip(axes[0], grids.items()):
        image = ax.imshow(np.asarray(grid), aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower",
                          extent=(0.5, large + 0.5, 0.5, small + 0.5))
        ax.set_xlabel(f"j (top directions of A, r={large})")
        ax.set_ylabel(f"i (r={small})")
        ax.set_title(f"{target_set}: phi(A_r={small}, A_r={large}, i, j)")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_effective_rank(payload: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for target_set, entries in _by_target_set(payload["summary"]).items():
        ranks = [e["rank"] for e in entries]
        line = ax.plot(ranks, [e["effective_rank_99"] for e in entries], marker="o", label=f"{target_set}, 99%")
        ax.plot(ranks, [e["effective_rank_90"] for e in entries], marker="s", linestyle="--",
                color=line[0].get_color(), label=f"{target_set}, 90%")
    ranks = sorted({e["rank"] for e in payload["summary"]})
    ax.plot(ranks, ranks, color="gray", linewidth=0.8, label="= r")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("effective rank of Delta W")
    ax.set_title("Energy-based effective rank (mean over modules, seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# The markdown.
# ----------------------------------------------------------------------------


def _setup_lines(payload: dict) -> list[str]:
    config, sweep = payload["config"], payload["sweep"]
    data, train, method = config["data"], config["train"], config["methods"][0]
    rows = payload["rows"] or payload.get("search_rows", [])
    steps = rows[0]["steps"] if rows else "?"
    length = f"{train['steps']} steps" if train.get("steps") else f"{train['epochs']} epoch(s)"
    lines = [
        f"- model `{config['model']['name']}`; data `{data['source']}` (train `{data['train_split']}`"
        + (f", first {data['max_train_rows']} rows" if data.get("max_train_rows") and data["row_selection"] == "first"
           else (f", {data['max_train_rows']} rows sampled (seed {data['row_seed']})" if data.get("max_train_rows")
                 else ""))
        + "".join(f"; {name} `{data[f'{name}_split']}`" for name in ("eval", "test") if data.get(f"{name}_split"))
        + f"), max_length {data['max_length']}",
        f"- training: {length} = {steps} optimizer steps of batch {train['batch_size']} x grad_accum "
        f"{train['grad_accum']}; {config['optim']['name']}, schedule {config['schedule']['decay']}, "
        f"precision {train['precision']}",
        f"- LoRA template: alpha {method.get('alpha')}, rslora {method.get('rslora', False)}, dropout "
        f"{method.get('dropout', 0.0)}, also_train {method.get('also_train', [])}",
        f"- swept: ranks {sweep['ranks']}, target sets {list(payload['target_sets'])}, seeds {sweep['seeds']}, "
        f"learning rates {sweep['learning_rates'] or config['optim']['learning_rate']}"
        + (f" (best on `{sweep['select_metric']}`)" if isinstance(sweep["learning_rates"], list)
           and len(sweep["learning_rates"]) > 1 else ""),
        "- target sets: " + "; ".join(f"`{name}` = `{targets}`" for name, targets in payload["target_sets"].items()),
        f"- grid trained with mode `{payload.get('mode')}`; device `{payload.get('versions', {}).get('device')}`",
    ]
    searches = [s for s in sweep.get("searches", ["grid"]) if s != "grid"]
    if searches:
        detail = {"dylora": lambda d: f"DyLoRA r_max {d['max_rank']} (b uniform from {d['min_rank']})",
                  "adalora": lambda d: f"AdaLoRA {d}",
                  "pilot": lambda d: f"pilot allocation of mean rank {d['mean_rank']} from rank {d['rank']} spectra"}
        lines.append("- also searched, on the same data, steps, optimizer and rates: "
                     + "; ".join(detail[s](sweep[s]) for s in searches))
    if payload.get("command"):
        lines.insert(0, f"- command: `{payload['command']}`")
    return lines


def _results_table(payload: dict) -> list[str]:
    metric = payload["sweep"]["metric"]
    lines = [
        f"| target set | rank | lr | {metric} (mean ± std, n) | trainable params | step time (s, whole program) "
        "| step time / member (s) | peak memory |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for e in payload["summary"]:
        flag = "" if e["all_finite"] else " (non-finite loss)"
        lines.append(
            f"| {e['target_set']} | {e['rank']} | {e['learning_rate']:g} | {_fmt(e['mean'])} ± {_fmt(e['std'])} "
            f"({e['seeds']}){flag} | {e['trainable_params']:,} | {_fmt(e['step_time_s'], 3)} "
            f"(K={e['members_in_program']}) | {_fmt(e['step_time_per_member_s'], 3)} | "
            f"{_bytes(e['peak_memory_bytes'])} |"
        )
    return lines


def _pivot(payload: dict) -> list[str]:
    grouped = _by_target_set(payload["summary"])
    ranks = sorted({e["rank"] for e in payload["summary"]})
    lines = ["| rank | " + " | ".join(grouped) + " |", "| ---: |" + " --- |" * len(grouped)]
    for rank in ranks:
        cells = []
        for entries in grouped.values():
            found = next((e for e in entries if e["rank"] == rank), None)
            cells.append("" if found is None else f"{_fmt(found['mean'])} ± {_fmt(found['std'])}")
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return lines


def _effective_rank_table(payload: dict) -> list[str]:
    lines = ["| target set | rank | effective rank, 90% energy | effective rank, 99% energy |",
             "| --- | ---: | ---: | ---: |"]
    for e in payload["summary"]:
        lines.append(f"| {e['target_set']} | {e['rank']} | {_fmt(e['effective_rank_90'], 2)} | "
                     f"{_fmt(e['effective_rank_99'], 2)} |")
    return lines


def _similarity_lines(payload: dict) -> list[str]:
    sim = payload["similarity"]
    lines = []
    if sim["across_ranks"]:
        lines += [
            f"Rank r vs rank {sim['largest_rank']} at the same seed (mean over modules and seeds). "
            "phi(i', j') = ||U_i'^T U_j'||_F^2 / min(i', j') over top singular directions in input space; "
            "`A`: of A (Hu et al. 2021, section 7.2); `dW`: of Delta W = s A B (the directions the update reads); "
            "random: the expectation max(i', j') / d for random subspaces.",
            "",
            "| target set | r | phi_A(1,1) | phi_A(r,r) | phi_dW(1,1) | phi_dW(r,r) | random (1,1) | random (r,r) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in sim["across_ranks"]:
            lines.append(
                f"| {s['target_set']} | {s['rank']} | {_fmt(s['phi_A_top1'], 3)} | {_fmt(s['phi_A_top_r'], 3)} | "
                f"{_fmt(s['phi_dW_top1'], 3)} | {_fmt(s['phi_dW_top_r'], 3)} | {_fmt(s['random_top1'], 3)} | "
                f"{_fmt(s['random_top_r'], 3)} |"
            )
        lines.append("")
    if sim["across_seeds"]:
        lines += [
            "Same rank, different seeds (mean over seed pairs and modules):",
            "",
            "| target set | r | phi_A(1,1) | phi_A(r,r) | phi_dW(1,1) | phi_dW(r,r) | random (r,r) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in sim["across_seeds"]:
            lines.append(
                f"| {s['target_set']} | {s['rank']} | {_fmt(s['phi_A_top1'], 3)} | {_fmt(s['phi_A_top_r'], 3)} | "
                f"{_fmt(s['phi_dW_top1'], 3)} | {_fmt(s['phi_dW_top_r'], 3)} | {_fmt(s['random_top_r'], 3)} |"
            )
        lines.append("")
    lines += _similarity_notes(sim)
    return lines


def _similarity_notes(sim: dict) -> list[str]:
    """A sentence or two per target set, written from the numbers."""
    notes = []
    largest = sim["largest_rank"]
    for target_set in sorted({s["target_set"] for s in sim["across_ranks"]}):
        rows = [s for s in sim["across_ranks"] if s["target_set"] == target_set]
        top = max(rows, key=lambda s: s["phi_A_top1"])
        ratio = np.mean([s["phi_A_top_r"] / s["random_top_r"] for s in rows])
        line = (
            f"- `{target_set}`, one seed: the top direction of A at rank {top['rank']} and at rank {largest} overlap "
            f"with phi = {top['phi_A_top1']:.3f} (Delta W: {top['phi_dW_top1']:.3f}; random {top['random_top1']:.4f}); "
            f"over all r directions, phi(r, r) averages {ratio:.1f}x the random level."
        )
        seeds = [s for s in sim["across_seeds"] if s["target_set"] == target_set and s["rank"] == largest]
        if seeds:
            line += (f" Rank {largest} at two seeds: phi(1, 1) = {seeds[0]['phi_A_top1']:.3f}, phi(r, r) = "
                     f"{seeds[0]['phi_A_top_r']:.3f} (random {seeds[0]['random_top_r']:.3f}).")
        notes.append(line)
    if notes:
        notes.append(
            "- Each member's A is drawn at its own shape, so the A's of two ranks start unrelated (phi at the random "
            "level); overlap above that was learned. Runs of one seed also share the data order, the new head's "
            "initialisation and the dropout masks, which runs of two seeds do not: the across-seed table separates "
            "what the task makes common from what one seed's shared history does."
        )
    return notes


def _timing_lines(payload: dict) -> list[str]:
    timing = payload["timing"]
    lines = ["| mode | wall (s) | setup (s) | compilation (s) | training (s) | evaluation (s) | training FLOPs (XLA) "
             "| optimizer steps | load before (1/5/15 min) | load after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for mode in ("batched", "sequential"):
        if mode not in timing:
            continue
        t = timing[mode]
        before, after = t["load_before"], t["load_after"]
        lines.append(
            f"| {mode} | {t['wall_s']:.0f} | {t['setup_s_total']:.0f} | "
            f"{t['compile_s_total'] + t['eval_compile_s_total']:.0f} | {t['train_s_total']:.0f} | "
            f"{t['eval_s_total']:.0f} | {t['train_flops_total']:.3g} | {t['optimizer_steps_total']:,} | "
            f"{before['loadavg_1m']:.1f}/{before['loadavg_5m']:.1f}/{before['loadavg_15m']:.1f} on "
            f"{before['cpu_count']} CPUs | {after['loadavg_1m']:.1f}/{after['loadavg_5m']:.1f}/"
            f"{after['loadavg_15m']:.1f} |"
        )
    lines += ["", "Compilation (tracing, lowering and XLA compiling the training step for each batch shape, and the "
                  "evaluation) is measured from JAX's compile events and excluded from the training and evaluation "
                  "columns. Training FLOPs are XLA's count of the compiled step, summed over the steps taken (a "
                  "batched program's FLOPs are all its members')."]
    reused = {mode: timing[mode].get("points_reused", 0) for mode in ("batched", "sequential") if mode in timing}
    if any(reused.values()):
        counts = ", ".join(f"{mode}: {n}" for mode, n in reused.items() if n)
        lines += ["", f"Resumed: the wall times cover this invocation alone; points read back from an earlier, "
                      f"interrupted one ({counts}) keep their own step and setup times."]
    if "batched_over_sequential" in timing:
        lines += ["", f"**Wall-time ratio batched / sequential: {timing['batched_over_sequential']:.3f}** "
                      "(the same points, one invocation)."]
    agreement = payload.get("agreement")
    if agreement:
        parts = [f"{k.removeprefix('max_abs_diff_')} {v:.2e}" for k, v in agreement.items() if k != "points"]
        lines += ["", f"Batched vs sequential, same {agreement['points']} points, largest absolute difference: "
                      + ", ".join(parts) + "."]
    return lines


def _grid_sections(payload: dict, plots: pathlib.Path, metric: str) -> list[str]:
    plot_metric_vs_rank(payload, plots / "metric_vs_rank.png")
    plot_pareto(payload, plots / "pareto.png")
    plot_spectra(payload, plots / "spectra.png")
    plot_effective_rank(payload, plots / "effective_rank.png")
    has_similarity = plot_similarity(payload, plots / "similarity.png")
    lines = [f"## {metric} by rank and target set", "", *_pivot(payload), "", "![metric vs rank]"
             f"({PLOTS_DIR}/metric_vs_rank.png)", "", "### Every (target set, rank)", "", *_results_table(payload),
             "", "Step time is the mean wall time of one optimizer step after the first, compilation excluded; in "
             "batched mode one step trains all K members of the program, so the per-member figure is the "
             "program's step time / K. Peak memory is the device's peak so far (XLA reports none on CPU).", ""]
    lines += ["## Pareto front: trainable parameters vs " + metric, ""]
    lines += [f"- {p['target_set']} r={p['rank']}: {p['trainable_params']:,} params, {_fmt(p['mean'])} ± "
              f"{_fmt(p['std'])}" for p in payload["pareto"]]
    lines += ["", f"![Pareto front]({PLOTS_DIR}/pareto.png)", ""]
    lines += ["## Spectrum and effective rank of the learned Delta W", "",
              "Singular values of Delta W = s A B per adapted module (float64, through the factors); the effective "
              "rank is the fewest singular values holding 90% / 99% of sum(sigma^2).", "",
              *_effective_rank_table(payload), "", f"![spectra]({PLOTS_DIR}/spectra.png)", "",
              f"![effective rank]({PLOTS_DIR}/effective_rank.png)", ""]
    lines += ["## Subspace similarity", "", *_similarity_lines(payload), ""]
    if has_similarity:
        lines += [f"![similarity]({PLOTS_DIR}/similarity.png)", ""]
    lines += ["## Timing", "", *_timing_lines(payload), ""]
    return lines


# ----------------------------------------------------------------------------
# The comparison of searches (peftjax.rank_search.compare).
# ----------------------------------------------------------------------------

SEARCH_TITLES = {"grid": "grid", "dylora": "DyLoRA", "adalora": "AdaLoRA", "pilot": "pilot allocation"}
_MARKERS = {"grid": "o", "dylora": "s", "adalora": "^", "pilot": "D"}


def plot_comparison(payload: dict, path: pathlib.Path) -> None:
    """Metric vs trainable parameters (per rank for the grid and DyLoRA) and vs the search's training FLOPs."""
    plt = _pyplot()
    fig, (by_params, by_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
    for entry in payload["comparison"]["entries"]:
        search, marker = entry["search"], _MARKERS[entry["search"]]
        label = f"{SEARCH_TITLES[search]}, {entry['target_set']}"
        points = entry["by_rank"] if search in ("grid", "dylora") else [entry]
        by_params.errorbar([e["trainable_params"] for e in points], [e["mean"] for e in points],
                           yerr=[e["std"] for e in points], marker=marker, capsize=2, label=label,
                           linestyle={"grid": "-", "dylora": "--"}.get(search, "none"))
        by_flops.errorbar([entry["train_flops"]], [entry["mean"]], yerr=[entry["std"]], marker=marker, capsize=2,
                          label=label, linestyle="none")
    by_params.set_xlabel("trainable parameters")
    by_params.set_ylabel(f"{payload['sweep']['metric']} (mean ± std over seeds)")
    by_params.set_title("Metric vs trainable parameters")
    by_flops.set_xlabel("training FLOPs of the whole search (XLA, all seeds)")
    by_flops.set_title("Picked configuration vs search cost")
    for ax in (by_params, by_flops):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _comparison_table(payload: dict) -> list[str]:
    comparison = payload["comparison"]
    goal, metric = comparison["goal"], payload["sweep"]["metric"]
    lines = [
        f"| search | target set | picks (by `{payload['sweep']['select_metric']}`) | {metric} (mean ± std, n) | "
        "vs grid's best (points) | trainable params | wall (s) | compilation (s) | training (s) | evaluation (s) | "
        "optimizer steps | training FLOPs | FLOPs / grid's | goal |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in comparison["entries"]:
        picks = f"mean kept rank {e['mean_kept_rank']:.2f}" if "mean_kept_rank" in e else f"rank {e['picked_rank']}"
        delta, fraction = e.get("points_from_grid_best"), e.get("flops_fraction_of_grid")
        meets = "" if e["search"] == "grid" or "meets_goal" not in e else ("met" if e["meets_goal"] else "missed")
        lines.append(
            f"| {SEARCH_TITLES[e['search']]} | {e['target_set']} | {picks} | {_fmt(e['mean'])} ± {_fmt(e['std'])} "
            f"({e['seeds']}) | {'' if delta is None else f'{delta:+.2f}'} | {e['trainable_params']:,} | "
            f"{e['wall_s']:.0f} | {e['compile_s']:.0f} | {e['train_s']:.0f} | {e['eval_s']:.0f} | "
            f"{e['optimizer_steps']:,} | {e['train_flops']:.3g} | {'' if fraction is None else f'{fraction:.3f}'} | "
            f"{meets} |"
        )
    lines += ["", f"The grid's best is its rank of best mean {metric} for the target set; a search meets the goal "
                  f"when its pick is within {goal['points']:g} point of it at no more than {goal['flops_fraction']:g}x "
                  "the grid's training FLOPs (same target set, all seeds). Costs are summed over seeds; the pilot "
                  "allocation's include its pilot run. Trainable parameters: AdaLoRA's count the triplets it kept."]
    return lines


def _rank_pivot(payload: dict) -> list[str]:
    """Metric by rank for the grid and DyLoRA, side by side."""
    columns = [e for e in payload["comparison"]["entries"] if e["search"] in ("grid", "dylora")]
    if not any(e["search"] == "dylora" for e in columns):
        return []
    ranks = sorted({r["rank"] for e in columns for r in e["by_rank"]})
    header = " | ".join(f"{SEARCH_TITLES[e['search']]} {e['target_set']}" for e in columns)
    lines = [f"| rank | {header} |", "| ---: |" + " --- |" * len(columns)]
    for rank in ranks:
        cells = []
        for e in columns:
            found = next((r for r in e["by_rank"] if r["rank"] == rank), None)
            cells.append("" if found is None else f"{_fmt(found['mean'])} ± {_fmt(found['std'])}")
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return lines


def _allocation_lines(payload: dict) -> list[str]:
    """AdaLoRA's and the pilot's ranks per module kind, layer by layer, mean over seeds."""
    lines = []
    for e in payload["comparison"]["entries"]:
        if "rank_patterns" not in e:
            continue
        per_module: dict[str, list[int]] = {}
        for pattern in e["rank_patterns"]:
            for module, rank in pattern.items():
                per_module.setdefault(module, []).append(rank)
        kinds: dict[str, list[tuple[int, float]]] = {}
        for module, ranks in per_module.items():
            parts = module.split(".")
            last_layer = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
            layer = int(parts[last_layer]) if last_layer >= 0 else -1
            kinds.setdefault(".".join(parts[last_layer + 1:]), []).append((layer, float(np.mean(ranks))))
        lines.append(f"- {SEARCH_TITLES[e['search']]}, `{e['target_set']}` (mean rank per module "
                     f"{e['mean_kept_rank']:.2f}), layer by layer:")
        lines += [f"  - `{kind}`: " + ", ".join(f"{r:.1f}" for _, r in sorted(values))
                  for kind, values in sorted(kinds.items())]
    return lines


def _comparison_section(payload: dict, plots: pathlib.Path) -> list[str]:
    plot_comparison(payload, plots / "comparison.png")
    lines = ["## Searches on the same data and budget", "", *_comparison_table(payload), "",
             f"![comparison]({PLOTS_DIR}/comparison.png)", ""]
    pivot = _rank_pivot(payload)
    if pivot:
        lines += ["### Every rank: trained alone (grid) or read off one DyLoRA run", "", *pivot, ""]
    allocations = _allocation_lines(payload)
    if allocations:
        lines += ["### Allocations", "", *allocations, ""]
    return lines


def write_report(payload: dict[str, Any], out: pathlib.Path, *, notes: Sequence[str] = ()) -> pathlib.Path:
    """Write ``report.md`` and ``plots/*.png`` into ``out``; returns the report's path."""
    out = pathlib.Path(out)
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    metric = payload["sweep"]["metric"]
    lines = [f"# Rank search: {payload['config']['name']}", "", *_setup_lines(payload), ""]
    if payload.get("comparison", {}).get("entries"):
        lines += _comparison_section(payload, plots)
    if payload.get("summary"):
        lines += _grid_sections(payload, plots, metric)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
