"""The demo's PNG plots (matplotlib, the `plot` extra), drawn from results.json and the scores directory.

    loss_vs_tokens.png      validation LM loss vs training tokens of every arm (over several seeds: the mean,
                            and a band of ± the sample standard deviation), teacher and random lines
    importance_heads.png    head importance [layer x head], the width plan's kept heads marked
    importance_ffn.png      MLP neuron importance [layer x neuron], each layer sorted high to low
    layer_scores.png        Block Importance, LM loss without each layer, LM loss without each block
    aggregation_grid.png    zero-shot LM loss of the 3x3 (sequence x batch) aggregations
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(results: dict, out: Path) -> list[Path]:
    """Draw every plot into `out`; returns the files written."""
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.plan import load_plan

    out.mkdir(parents=True, exist_ok=True)
    scores = load_scores(results["importance"]["scores"])
    width_plan = load_plan(Path(results["config"]["out"]) / "plans" / "width.json")
    return [loss_vs_tokens(results, out / "loss_vs_tokens.png"),
            heads_heatmap(scores["heads"], width_plan, out / "importance_heads.png"),
            ffn_heatmap(scores["ffn"], out / "importance_ffn.png"),
            layer_scores(results["importance"], results["teacher"]["val_loss"], out / "layer_scores.png"),
            aggregation_grid(results["grid"], out / "aggregation_grid.png")]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_vs_tokens(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_loss_vs_tokens(ax, results)
    return _save(fig, path)


def draw_loss_vs_tokens(ax, results: dict) -> None:
    """Each arm's mean validation curve, over several seeds with a band of ± its spread (one
    fill_between per arm, in ARMS order), and the teacher's and the random ranking's losses."""
    seeds = len(results["seeds"])
    for arm in results["arms"].values():
        tokens, losses = zip(*arm["curve"])
        x = [t / 1e3 for t in tokens]
        line, = ax.plot(x, losses, marker="o", markersize=3, label=f"{arm['label']} ({arm['params'] / 1e6:.1f}M)")
        if seeds > 1:
            ax.fill_between(x, [m - s for m, s in zip(losses, arm["curve_spread"])],
                            [m + s for m, s in zip(losses, arm["curve_spread"])], color=line.get_color(), alpha=0.2,
                            linewidth=0)
    ax.axhline(results["teacher"]["val_loss"], color="black", linestyle="--",
               label=f"teacher ({results['teacher']['params'] / 1e6:.1f}M)")
    ax.axhline(results["zero_shot"]["random"], color="gray", linestyle=":", label="random-ranked width, zero-shot")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation LM loss")
    ax.set_title("Retraining at equal tokens" + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""))
    # the from-scratch curve starts near ln(vocab); keep the pruned arms readable
    finals = [a["final"] for a in results["arms"].values()] + [results["zero_shot"]["random"]]
    ax.set_ylim(results["teacher"]["val_loss"] - 0.2, max(finals) + 0.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def heads_heatmap(heads, plan, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(4, heads.shape[1] * 0.6), max(3, heads.shape[0] * 0.4)))
    image = ax.imshow(heads.numpy(), aspect="auto", cmap="viridis")
    for row, layer in enumerate(plan.layers):  # the width plan keeps every layer
        for head in plan.heads[row]:
            ax.text(head, layer, "x", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("query head (x: kept by the width plan)")
    ax.set_ylabel("layer")
    ax.set_title("Attention head importance")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def ffn_heatmap(ffn, path: Path) -> Path:
    import torch

    fig, ax = plt.subplots(figsize=(8, max(3, ffn.shape[0] * 0.4)))
    image = ax.imshow(torch.sort(ffn, dim=1, descending=True).values.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("MLP neuron, sorted by importance within each layer")
    ax.set_ylabel("layer")
    ax.set_title("MLP neuron importance")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def layer_scores(importance: dict, teacher_loss: float, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    layers = range(len(importance["layers_bi"]))
    axes[0].bar(layers, importance["layers_bi"])
    axes[0].set_title("Block Importance (1 - cos)")
    axes[1].bar(layers, importance["layers_lm_loss"])
    axes[1].axhline(importance["calibration_lm_loss"], color="black", linestyle="--", label="all layers")
    axes[1].set_title("LM loss without the layer")
    axes[1].legend(fontsize=8)
    k = importance["block_size"]
    axes[2].bar(range(len(importance["block_lm_loss"])), importance["block_lm_loss"])
    axes[2].set_title(f"LM loss without layers s..s+{k - 1}")
    axes[2].axhline(importance["calibration_lm_loss"], color="black", linestyle="--")
    for ax, label, count in zip(axes, ("layer", "layer", "first removed layer s"),
                                (len(layers), len(layers), len(importance["block_lm_loss"]))):
        ax.set_xlabel(label)
        ax.set_xticks(range(count))
    for ax in axes[1:]:
        low = min(min(importance["layers_lm_loss"]), importance["calibration_lm_loss"])
        ax.set_ylim(bottom=low - 0.2)
    return _save(fig, path)


def aggregation_grid(grid: dict, path: Path) -> Path:
    import numpy as np

    values = np.array(grid["loss"])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(values, cmap="viridis_r")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(grid["batch"])), grid["batch"])
    ax.set_yticks(range(len(grid["seq"])), grid["seq"])
    ax.set_xlabel("batch aggregation")
    ax.set_ylabel("sequence aggregation")
    ax.set_title("Zero-shot LM loss by aggregation")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)
