"""The chapter's loss plot: training solid, validation dash-dot, epochs below, tokens seen above."""

from __future__ import annotations

from pathlib import Path


def _save(fig, out_stem: Path) -> list[Path]:
    import io

    import matplotlib.pyplot as plt

    from instructkit.fileio import atomic_write_bytes

    written = []
    for suffix in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix, dpi=120)
        written.append(atomic_write_bytes(out_stem.with_suffix(f".{suffix}"), buffer.getvalue()))
    plt.close(fig)
    return written


def plot_quality(evals: list[dict], out_stem: Path) -> list[Path]:
    """The loss plot's companion: scores of generated validation responses at each evaluation
    (ROUGE-L and exact-check accuracy on the left axis, chrF and BLEU on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in evals if "val_rouge_l" in row]
    epochs = [row["epoch"] for row in rows]
    fig, left = plt.subplots(figsize=(7, 4))
    right = left.twinx()
    left.plot(epochs, [row["val_rouge_l"] for row in rows], marker="o", label="ROUGE-L")
    if all("val_accuracy" in row for row in rows):
        left.plot(epochs, [row["val_accuracy"] for row in rows], marker="o", label="exact-check accuracy")
    right.plot(epochs, [row["val_chrf"] for row in rows], linestyle="--", marker="s", color="tab:green", label="chrF")
    right.plot(epochs, [row["val_bleu"] for row in rows], linestyle=":", marker="^", color="tab:red", label="BLEU")
    left.set_xlabel("Epochs")
    left.set_ylabel("ROUGE-L / accuracy (0-1)")
    right.set_ylabel("chrF / BLEU (0-100)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="lower right")
    left.set_title("Greedy validation responses during training")
    fig.tight_layout()
    return _save(fig, out_stem)


def plot_losses(evals: list[dict], out_stem: Path) -> list[Path]:
    """evals: rows with epoch (fractional), tokens_seen, train_loss, val_loss. Writes PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in evals]
    tokens = [row["tokens_seen"] for row in evals]
    train = [row["train_loss"] for row in evals]
    val = [row["val_loss"] for row in evals]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(epochs, train, label="Training loss")
    ax1.plot(epochs, val, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()  # a second x-axis sharing the y-axis
    ax2.plot(tokens, train, alpha=0)  # invisible, only aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    return _save(fig, out_stem)


def plot_dpo(evals: list[dict], loss_stem: Path, margin_stem: Path) -> list[Path]:
    """DPO's two plots, as in the book's notebook: the loss, and the reward margin (chosen minus
    rejected reward), training solid and validation dash-dot, over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    epochs = [row["epoch"] for row in evals]
    for stem, key, label in ((loss_stem, "loss", "DPO loss"), (margin_stem, "reward_margin", "Reward margin")):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(epochs, [row[f"train_{key}"] for row in evals], label=f"Training {label.lower()}")
        ax.plot(epochs, [row[f"val_{key}"] for row in evals], linestyle="-.", label=f"Validation {label.lower()}")
        ax.set_xlabel("Epochs")
        ax.set_ylabel(label)
        ax.legend(loc="best")
        fig.tight_layout()
        written += _save(fig, stem)
    return written
