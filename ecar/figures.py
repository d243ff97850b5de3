"""The pictures jobs show: labelled sample grids, tokenizer reconstructions, the loss curve.

Each returns a matplotlib figure (Agg backend: no display needed); `ecar.tracking` logs them to
MLflow, the quickstart writes one to storage.
"""

from __future__ import annotations

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shown(image_CHW: torch.Tensor):
    """An image as imshow takes it: 3 channels (or the first one), normalised to [0, 1] per image,
    so latents show too."""
    image = image_CHW.float()
    image = image[:3] if image.shape[0] >= 3 else image[:1]
    low, high = image.amin(), image.amax()
    image = ((image - low) / (high - low + 1e-8)).permute(1, 2, 0).numpy()
    return (image[..., 0], "gray") if image.shape[-1] == 1 else (image, None)


def sample_grid(images_BCHW: torch.Tensor, labels_B: torch.Tensor, title: str, class_names: list[str] | None = None):
    """One column per sample, labelled by class. `images_BCHW` are decoded images in [-1, 1]
    with 1 or 3 channels, or latents whose first channel(s) are shown (normalised per image)."""
    plt = _pyplot()
    count = images_BCHW.shape[0]
    columns = min(count, 10)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows + 0.4), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= count:
            continue
        image, cmap = _shown(images_BCHW[index])
        ax.imshow(image, cmap=cmap)
        label = int(labels_B[index])
        ax.set_title(class_names[label] if class_names and label < len(class_names) else f"class {label}", fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure


def reconstruction_grid(originals_BCHW: torch.Tensor, reconstructions_BCHW: torch.Tensor, title: str):
    """Originals in the top row, their reconstructions below (images in [-1, 1], shown on a
    common scale so that a contrast loss is visible)."""
    plt = _pyplot()
    count = originals_BCHW.shape[0]
    figure, axes = plt.subplots(2, count, figsize=(1.1 * count, 2.6), squeeze=False)
    for column in range(count):
        for row, images in enumerate((originals_BCHW, reconstructions_BCHW)):
            image = ((images[column].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            gray = image.shape[-1] == 1
            axes[row, column].imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=1)
            axes[row, column].axis("off")
    axes[0, 0].set_title("original", fontsize=7, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=7, loc="left")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure


def loss_curve(history: dict[str, list[tuple[int, float]]]):
    """Total and per-stage loss against the step: {metric name: [(step, value), ...]}."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, points in sorted(history.items()):
        points = sorted(points)
        axes.plot([s for s, _ in points], [v for _, v in points], label=key, linewidth=2.0 if key == "loss" else 1.0)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    return figure
