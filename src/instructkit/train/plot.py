"""The chapter's loss plot: training solid, validation dash-dot, epochs below, tokens seen above."""

from __future__ import annotations

from pathlib import Path


def plot_losses(evals: list[dict], out_stem: Path) -> list[Path]:
    """evals: rows with epoch (fractional), tokens_seen, train_loss, val_loss. Writes PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from instructkit.fileio import atomic_write_bytes

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
    written = []
    for suffix in ("png", "pdf"):
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix, dpi=120)
        written.append(atomic_write_bytes(out_stem.with_suffix(f".{suffix}"), buffer.getvalue()))
    plt.close(fig)
    return written
