"""Evidence figure for ForceRegularization: ``docs/img/force_rank.png``.

Trains the digits SmallCNN (``lightning_struct.models.digits_cnn``, 8x8 images, Adam lr 2e-3
with cosine decay, 8 epochs, fixed seeds) once per strength and reports, over the regularized
layers (``conv2``, ``conv3``, ``fc1``, ``fc2``: the default selection leaves out the first conv
and the classifier):

* the filter rank at 0.95 energy per layer, with and without the force;
* the summed rank over training (logged by the callback itself; the baseline run uses the
  callback with ``strength=0``, which only monitors);
* a strength sweep: summed rank, validation top-1 accuracy, and the validation accuracy after
  truncating every regularized layer to its 0.95-energy rank (SVD, no fine-tuning), which
  checks that the lower rank is usable and not an artefact of one dominant direction.

Run from the repository root (about a minute on 2 cores)::

    python docs/make_force_figure.py            # writes docs/img/force_rank.png, prints a table
    python docs/make_force_figure.py --json docs/img/force_rank.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_struct import DigitsDataModule, ForceRegularization, ImageClassifier
from lightning_struct.models import digits_cnn
from lightning_struct.ops.force import filter_rank

HERE = Path(__file__).resolve().parent
STRENGTHS = [0.0, 3e-5, 1e-4, 3e-4, 1e-3]
CHOSEN = 1e-4
ENERGY = 0.95
EPOCHS = 8
IMAGE_SIZE = 8


def train_digits(strength: float, seed: int = 0, epochs: int = EPOCHS, log_every: int = 4) -> dict[str, Any]:
    """One run; returns ranks per layer, accuracies and the callback's rank history."""
    pl.seed_everything(seed, workers=True)
    net = digits_cnn(image_size=IMAGE_SIZE)
    model = ImageClassifier(
        net,
        num_classes=10,
        optimizer=partial(torch.optim.Adam, lr=2e-3),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    cb = ForceRegularization(strength, kind="l2", log_every_n_steps=log_every, energies=(ENERGY,))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # accuracy is measured below, once, on the whole validation split
        deterministic=True,
    )
    dm = DigitsDataModule(image_size=IMAGE_SIZE, seed=0)
    trainer.fit(model, dm)
    layers = {layer.name.rsplit(".", 1)[-1]: layer.module for layer in cb.layers}
    ranks = {name: filter_rank(m.weight, ENERGY) for name, m in layers.items()}
    full = {layer.name.rsplit(".", 1)[-1]: layer.full_rank for layer in cb.layers}

    # top-1 accuracy over the validation samples (micro average), then again with every
    # regularized layer truncated to its 0.95-energy rank (SVD, no fine-tuning)
    x, y = dm.val_set.tensors  # type: ignore[union-attr]
    net.eval()
    saved = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
        for name, m in layers.items():
            w = m.weight.reshape(m.weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = ranks[name]
            m.weight.copy_(((u[:, :r] * s[:r]) @ vh[:r]).reshape(m.weight.shape))
        truncated_acc = float((net(x).argmax(1) == y).float().mean())
    net.load_state_dict(saved)
    history = [(int(h["step"]), int(h[f"force/total_rank@{ENERGY:g}"])) for h in cb.history]
    return {
        "strength": strength,
        "val_acc": acc,
        "truncated_val_acc": truncated_acc,
        "ranks": ranks,
        "full_ranks": full,
        "total_rank": sum(ranks.values()),
        "full_rank": sum(full.values()),
        "history": history,
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in runs if r["strength"] == 0.0)
    chosen = next(r for r in runs if r["strength"] == CHOSEN)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))

    ax = axes[0]
    names = list(base["ranks"])
    xs = range(len(names))
    ax.bar([i - 0.2 for i in xs], [base["ranks"][n] for n in names], 0.4, label="no force")
    ax.bar([i + 0.2 for i in xs], [chosen["ranks"][n] for n in names], 0.4, label=f"L2 force {CHOSEN:g}")
    ax.scatter(
        list(xs), [base["full_ranks"][n] for n in names], marker="_", s=300, color="k", label="full rank"
    )
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(f"filter rank at {ENERGY:g} energy")
    ax.set_title("rank per layer after training")
    ax.legend(fontsize=8)

    ax = axes[1]
    for run, label in ((base, "no force"), (chosen, f"L2 force {CHOSEN:g}")):
        steps, totals = zip(*run["history"])
        ax.plot(steps, totals, label=label)
    ax.axhline(base["full_rank"], color="k", lw=0.8, ls=":", label="full rank")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"summed rank at {ENERGY:g} energy")
    ax.set_title("during training (logged by the callback)")
    ax.legend(fontsize=8)

    ax = axes[2]
    sw = [r for r in runs if r["strength"] > 0]
    s = [r["strength"] for r in sw]
    ax.semilogx(s, [r["total_rank"] / r["full_rank"] for r in sw], "o-", label="rank fraction")
    ax.axhline(base["total_rank"] / base["full_rank"], color="C0", ls=":", lw=1)
    ax.set_xlabel("strength")
    ax.set_ylabel("summed rank / full rank")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.semilogx(s, [100 * r["val_acc"] for r in sw], "s-", color="C1", label="val acc")
    ax2.semilogx(s, [100 * r["truncated_val_acc"] for r in sw], "^--", color="C2", label="val acc, truncated")
    ax2.axhline(100 * base["val_acc"], color="C1", ls=":", lw=1)
    ax2.set_ylabel("val accuracy (%)")
    ax2.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="lower left")
    ax.set_title("strength sweep (dotted: no force)")

    fig.suptitle("ForceRegularization on digits (SmallCNN, 8x8, Adam, 8 epochs, seed 0)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "img" / "force_rank.png"))
    parser.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

    runs = [train_digits(s) for s in STRENGTHS]
    print(f"| strength | summed rank@{ENERGY:g} | fraction | val acc | val acc truncated | per layer |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        per_layer = ", ".join(f"{k} {v}/{r['full_ranks'][k]}" for k, v in r["ranks"].items())
        print(
            f"| {r['strength']:g} | {r['total_rank']} / {r['full_rank']} | {r['total_rank'] / r['full_rank']:.3f} "
            f"| {100 * r['val_acc']:.2f} | {100 * r['truncated_val_acc']:.2f} | {per_layer} |"
        )
    base = runs[0]
    chosen = next(r for r in runs if r["strength"] == CHOSEN)
    print(
        f"strength {CHOSEN:g}: summed rank {chosen['total_rank']} vs {base['total_rank']} "
        f"({100 * (1 - chosen['total_rank'] / base['total_rank']):.1f}% lower), "
        f"val acc {100 * chosen['val_acc']:.2f} vs {100 * base['val_acc']:.2f}"
    )
    out = Path(args.out)
    plot(runs, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
