"""t-SNE maps of pooled latents, coloured by label and by spurious attribute (two panels).

Features are standardised, reduced by PCA to at most 50 dimensions when wider (the usual t-SNE
preprocessing: it removes noise and makes the neighbour search cheap), then embedded with
scikit-learn's Barnes-Hut t-SNE (PCA initialisation, fixed seed, perplexity
``min(30, (n - 1) / 3)``). Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg), so
plotting never touches pyplot's global backend (safe in notebooks and on headless machines).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_TSNE_MAX = 2000
PCA_DIMS = 50


def tsne_embedding(X: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE embedding (n, 2) float32 of features ``X`` (n, D); needs n ≥ 4."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    X = StandardScaler().fit_transform(X)
    if X.shape[1] > PCA_DIMS and n > PCA_DIMS:
        X = PCA(PCA_DIMS, random_state=seed).fit_transform(X)
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca",
                random_state=seed)
    return tsne.fit_transform(X).astype(np.float32)


# One colour meaning per figure: the label panel draws from the first colours of tab10 and the
# attribute panel from its last ones, so no colour stands for a class on the left and for an
# attribute value on the right (Animals: 4 classes, 4 attribute values: 8 distinct colours).
LABEL_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#17becf")
ATTRIBUTE_COLOURS = ("#9467bd", "#bcbd22", "#e377c2", "#8c564b", "#7f7f7f")


def _panel(ax, emb: np.ndarray, values: np.ndarray, names: Sequence[str], title: str,
           colours: Sequence[str], marker: str) -> None:
    # Draw the rarest values last so minority groups are not buried under the majority.
    order = sorted(np.unique(values), key=lambda v: -np.sum(values == v))
    size = float(np.clip(4000 / max(1, len(values)), 6, 40))  # fewer points, bigger dots
    handles = {}
    for k, v in enumerate(order):
        mask = values == v
        label = names[v] if 0 <= v < len(names) else str(v)
        handles[int(v)] = ax.scatter(
            emb[mask, 0], emb[mask, 1], s=size, alpha=0.7, linewidths=0, marker=marker,
            color=colours[int(v) % len(colours)], label=f"{label} (n={int(mask.sum())})",
            zorder=2 + k)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    shown = [handles[v] for v in sorted(handles)]  # legend in value order, not drawing order
    ax.legend(shown, [h.get_label() for h in shown], loc="best", fontsize=9,
              markerscale=max(1.0, (60 / size) ** 0.5),
              framealpha=0.85)


def plot_tsne(emb: np.ndarray, y: np.ndarray, a: np.ndarray, class_names: Sequence[str],
              attribute_names: Sequence[str], title: str, path: str | Path) -> Path:
    """Write a two-panel PNG: the embedding (n, 2) coloured by label ``y`` (left, circles) and
    by spurious attribute ``a`` (right, triangles), with disjoint colour sets so that a colour
    means one thing in the figure; legends name the values. Returns ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.6), layout="constrained")
    axes = fig.subplots(1, 2)
    _panel(axes[0], emb, np.asarray(y), class_names, "coloured by label y", LABEL_COLOURS, "o")
    _panel(axes[1], emb, np.asarray(a), attribute_names, "coloured by spurious attribute a",
           ATTRIBUTE_COLOURS, "^")
    fig.suptitle(title, fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    tmp.replace(path)
    return path


def figure_name(layer: str, latent: str) -> str:
    """File name of a layer's t-SNE figure: ``tsne_blocks.3.attn.qkv-q_z1.png``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", layer)
    return f"tsne_{safe}_{latent}.png"
