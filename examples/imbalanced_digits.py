"""Class-imbalanced digits: plain vs. class-weighted vs. label-smoothed loss.

Trains the same small MLP three times on an artificially imbalanced version of
scikit-learn's bundled 8x8 digits data (no download needed), using
``jxent.cross_entropy``:

1. plain cross-entropy,
2. class-weighted cross-entropy with inverse-frequency weights
   ``weight_c = N / (C * count_c)``,
3. label-smoothed cross-entropy (``label_smoothing=0.1``).

The training set keeps every example of the common classes 0-4 but only 10% of
the rare classes 5-9. The test set is balanced (the same number of examples per
class), so per-class recall and balanced accuracy show how each loss copes with
the imbalance. A table is printed and a grouped bar plot of per-class recall is
saved as a PNG.

Run from the repository root::

    python examples/imbalanced_digits.py
    python examples/imbalanced_digits.py --steps 600 --out /tmp/recall.png
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jxent

NUM_CLASSES = 10
RARE_CLASSES = (5, 6, 7, 8, 9)
RARE_KEEP_FRACTION = 0.1
HIDDEN = 64
SEED = 0
LEARNING_RATE = 3e-3
DEFAULT_STEPS = 300
DEFAULT_OUT = Path(__file__).resolve().parent / "imbalanced_digits.png"

Params = dict[str, jax.Array]


class Dataset(NamedTuple):
    """Standardised features and integer labels.

    Attributes:
        x: Features, shape ``(N, 64)``, float32.
        y: Labels in ``[0, 10)``, shape ``(N,)``, int32.
    """

    x: np.ndarray
    y: np.ndarray


class RunConfig(NamedTuple):
    """How one training run calls ``jxent.cross_entropy``.

    Attributes:
        name: Label used in the table and the plot.
        weight: Per-class weights of shape ``(C,)``, or ``None``.
        label_smoothing: Label smoothing amount in ``[0, 1]``.
    """

    name: str
    weight: jax.Array | None
    label_smoothing: float


def load_splits(seed: int = SEED) -> tuple[Dataset, Dataset]:
    """Builds an imbalanced training set and a balanced test set.

    The digits data is split 70/30, stratified by class. The test part is then
    cut down to the smallest per-class count so every class has exactly the
    same number of test examples. The training part keeps all examples of
    classes 0-4 and a random ``RARE_KEEP_FRACTION`` of classes 5-9. Features
    are standardised with training-set statistics.

    Args:
        seed: Seed for the split and the subsampling.

    Returns:
        The ``(train, test)`` datasets.
    """
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    rng = np.random.default_rng(seed)

    per_class = min(int(np.sum(y_test == c)) for c in range(NUM_CLASSES))
    test_idx = np.concatenate(
        [np.flatnonzero(y_test == c)[:per_class] for c in range(NUM_CLASSES)]
    )

    train_idx = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y_train == c)
        if c in RARE_CLASSES:
            keep = max(1, round(RARE_KEEP_FRACTION * idx.size))
            idx = rng.choice(idx, size=keep, replace=False)
        train_idx.append(idx)
    train_idx = rng.permutation(np.concatenate(train_idx))

    mean = x_train[train_idx].mean(axis=0)
    std = x_train[train_idx].std(axis=0) + 1e-6

    def standardise(a: np.ndarray) -> np.ndarray:
        return ((a - mean[None, :]) / std[None, :]).astype(np.float32)

    train = Dataset(standardise(x_train[train_idx]), y_train[train_idx])
    test = Dataset(standardise(x_test[test_idx]), y_test[test_idx])
    return train, test


def class_counts(y: np.ndarray) -> np.ndarray:
    """Counts the examples of each class.

    Args:
        y: Integer labels, shape ``(N,)``.

    Returns:
        Counts of shape ``(NUM_CLASSES,)``.
    """
    return np.bincount(y, minlength=NUM_CLASSES)


def inverse_frequency_weights(y: np.ndarray) -> jax.Array:
    """Computes ``weight_c = N / (C * count_c)`` (the "balanced" heuristic).

    Args:
        y: Integer training labels, shape ``(N,)``.

    Returns:
        Class weights of shape ``(NUM_CLASSES,)``, float32.
    """
    counts = class_counts(y).astype(np.float32)
    return jnp.asarray(y.size / (NUM_CLASSES * counts), dtype=jnp.float32)


def init_params(key: jax.Array, n_in: int, n_hidden: int, n_out: int) -> Params:
    """Initialises a one-hidden-layer MLP (He-normal weights, zero biases).

    Args:
        key: PRNG key.
        n_in: Input features.
        n_hidden: Hidden units.
        n_out: Output classes.

    Returns:
        Parameters ``w1 (n_in, n_hidden)``, ``b1 (n_hidden,)``,
        ``w2 (n_hidden, n_out)``, ``b2 (n_out,)``.
    """
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (n_in, n_hidden)) * jnp.sqrt(2.0 / n_in),
        "b1": jnp.zeros((n_hidden,)),
        "w2": jax.random.normal(k2, (n_hidden, n_out)) * jnp.sqrt(2.0 / n_hidden),
        "b2": jnp.zeros((n_out,)),
    }


def forward(params: Params, x: jax.Array) -> jax.Array:
    """Computes the MLP logits.

    Args:
        params: Parameters from :func:`init_params`.
        x: Inputs, shape ``(N, n_in)``.

    Returns:
        Logits, shape ``(N, n_out)``.
    """
    h = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
    return h @ params["w2"] + params["b2"][None, :]


def train(
    config: RunConfig,
    params: Params,
    data: Dataset,
    steps: int,
    learning_rate: float = LEARNING_RATE,
) -> Params:
    """Trains full-batch with Adam, showing a tqdm progress bar.

    Args:
        config: Which loss variant to use.
        params: Initial parameters (not modified).
        data: Training data.
        steps: Number of optimiser steps.
        learning_rate: Adam learning rate.

    Returns:
        The trained parameters.
    """
    optimizer = optax.adam(learning_rate)
    x = jnp.asarray(data.x)
    y = jnp.asarray(data.y)

    def loss_fn(p: Params) -> jax.Array:
        return jxent.cross_entropy(
            forward(p, x),
            y,
            config.weight,
            label_smoothing=config.label_smoothing,
        )

    @jax.jit
    def step(
        p: Params, opt_state: optax.OptState
    ) -> tuple[Params, optax.OptState, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = optimizer.init(params)
    with tqdm(range(steps), desc=f"{config.name:>9}", leave=True) as bar:
        for i in bar:
            params, opt_state, loss = step(params, opt_state)
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return params


def evaluate(params: Params, data: Dataset) -> tuple[np.ndarray, float]:
    """Computes per-class recall and plain accuracy.

    Args:
        params: Trained parameters.
        data: Evaluation data with every class present.

    Returns:
        Recall per class, shape ``(NUM_CLASSES,)``, and overall accuracy.
    """
    pred = np.asarray(jnp.argmax(forward(params, jnp.asarray(data.x)), axis=-1))
    hit = pred == data.y
    recall = np.bincount(data.y[hit], minlength=NUM_CLASSES) / class_counts(data.y)
    return recall, float(np.mean(hit))


def format_table(recalls: dict[str, np.ndarray], accuracies: dict[str, float]) -> str:
    """Formats per-class recall and summary metrics as a Markdown table.

    Args:
        recalls: Run name to per-class recall.
        accuracies: Run name to plain accuracy.

    Returns:
        The table as a string.
    """
    names = list(recalls)
    rare = list(RARE_CLASSES)
    rows: list[tuple[str, list[float]]] = [
        (f"{c}{' (rare)' if c in RARE_CLASSES else ''}", [recalls[n][c] for n in names])
        for c in range(NUM_CLASSES)
    ]
    rows += [
        ("rare-class recall", [float(np.mean(recalls[n][rare])) for n in names]),
        ("balanced accuracy", [float(np.mean(recalls[n])) for n in names]),
        ("accuracy", [accuracies[n] for n in names]),
    ]
    first = max(len(title) for title, _ in rows)
    lines = [
        f"| {'class':<{first}} | " + " | ".join(f"{n:>9}" for n in names) + " |",
        f"|{'-' * (first + 2)}|" + "|".join("-" * 10 + ":" for _ in names) + "|",
    ]
    for title, values in rows:
        cells = " | ".join(f"{v:>9.3f}" for v in values)
        lines.append(f"| {title:<{first}} | {cells} |")
    return "\n".join(lines)


def plot_recalls(recalls: dict[str, np.ndarray], out: Path) -> None:
    """Saves a grouped bar chart of per-class recall.

    Args:
        recalls: Run name to per-class recall.
        out: PNG path to write.
    """
    names = list(recalls)
    classes = np.arange(NUM_CLASSES)
    width = 0.8 / len(names)
    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)  # Render with Agg; no pyplot or GUI backend involved.
    ax = fig.subplots()
    for lo in RARE_CLASSES:
        ax.axvspan(lo - 0.5, lo + 0.5, color="0.92", zorder=0)
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        balanced = float(np.mean(recalls[name]))
        ax.bar(
            classes + offset,
            recalls[name],
            width,
            label=f"{name} (balanced acc {balanced:.3f})",
            zorder=2,
        )
    ax.set_xticks(classes)
    ax.set_xticklabels(
        [f"{c}\n(rare)" if c in RARE_CLASSES else str(c) for c in classes]
    )
    ax.set_xlabel(
        f"digit class (shaded: {RARE_KEEP_FRACTION:.0%} of training examples kept)"
    )
    ax.set_ylabel("test recall")
    ax.set_xlim(-0.5, NUM_CLASSES - 0.5)
    ax.set_ylim(0.0, 1.2)
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set_title("Per-class recall on a balanced test set")
    ax.legend(loc="upper center", ncol=len(names), fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def parse_args() -> argparse.Namespace:
    """Parses the command line.

    Returns:
        The parsed arguments (``steps`` and ``out``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"full-batch Adam steps per run (default {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where to save the recall plot (default: next to this script)",
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main() -> None:
    """Runs the three trainings, prints the table and saves the plot."""
    args = parse_args()
    jax.config.update("jax_numpy_rank_promotion", "raise")

    train_set, test_set = load_splits()
    counts = class_counts(train_set.y)
    common = [c for c in range(NUM_CLASSES) if c not in RARE_CLASSES]
    print(
        f"Rare classes {list(RARE_CLASSES)} keep {RARE_KEEP_FRACTION:.0%} of their "
        f"training examples; classes {common} keep all."
    )
    print("Training counts per class:", dict(enumerate(counts.tolist())))
    print(
        f"Balanced test set: {class_counts(test_set.y)[0]} per class, "
        f"{test_set.y.size} in total."
    )

    configs = [
        RunConfig("plain", None, 0.0),
        RunConfig("weighted", inverse_frequency_weights(train_set.y), 0.0),
        RunConfig("smoothed", None, 0.1),
    ]
    init = init_params(jax.random.key(SEED), train_set.x.shape[1], HIDDEN, NUM_CLASSES)

    recalls: dict[str, np.ndarray] = {}
    accuracies: dict[str, float] = {}
    for config in configs:
        params = train(config, init, train_set, args.steps)
        recalls[config.name], accuracies[config.name] = evaluate(params, test_set)

    print()
    print("Per-class recall on the balanced test set:")
    print(format_table(recalls, accuracies))
    print("(On a balanced test set, accuracy equals balanced accuracy.)")

    plot_recalls(recalls, args.out)
    print(f"\nSaved plot to {args.out}")


if __name__ == "__main__":
    main()
