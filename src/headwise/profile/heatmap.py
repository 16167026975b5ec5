"""The profile picture: one layers x heads heatmap per score, and the chosen policies."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from headwise.policies import Full, Policy, Quantized, Streaming


def policy_grid(policies: list[list[Policy]], native: list[int | None]) -> tuple[np.ndarray, list[list[str]]]:
    """[layers, kv_heads] share of the context each head keeps at its window (1 = full) and short labels."""
    grid = np.zeros((len(policies), len(policies[0])))
    labels: list[list[str]] = []
    for i, row in enumerate(policies):
        labels.append([])
        for j, p in enumerate(row):
            if isinstance(p, Full):
                grid[i, j] = 1.0
                labels[-1].append("full" if native[i] is None else f"w{native[i]}")
            elif isinstance(p, Streaming):
                grid[i, j] = 0.3
                labels[-1].append(f"{p.sink}+{p.window}")
            elif isinstance(p, Quantized):  # the whole context, in fewer bits: between streaming and full
                grid[i, j] = 0.9 if p.bits == 8 else 0.85 if p.k_bits == 8 else 0.8 if p.bits == 4 else 0.7
                labels[-1].append(p.bits_label)
            else:
                grid[i, j] = 0.6
                labels[-1].append(p.short())
    return grid, labels


def draw(path: str | os.PathLike[str], scores: dict[str, np.ndarray], policies: list[list[Policy]],
         native: list[int | None], title: str) -> Path:
    """Write a PNG: one panel per score ([layers, heads] each, query or KV heads) + the plan. Atomic."""
    panels = list(scores.items())
    n = len(panels) + 1
    n_layers = len(policies)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 1.5, max(3.0, 0.22 * n_layers + 1.2)), squeeze=False)
    for ax, (name, grid) in zip(axes[0], panels):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.05)
    grid, labels = policy_grid(policies, native)
    ax = axes[0][-1]
    ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("plan (KV heads)", fontsize=8)
    ax.set_xlabel("KV head", fontsize=7)
    ax.tick_params(labelsize=6)
    for i, row in enumerate(labels):
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=4.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".png", dir=p.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130)
        os.replace(tmp, p)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return p
