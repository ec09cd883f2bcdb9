"""Training curves (``training_curves.png``), redrawn after every epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from decode_var.core.atomic import atomic_write
from decode_var.core.channels import CHANNELS


def _plt():
    import matplotlib  # lazy: matplotlib costs 0.2-0.4 s, paid only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy, as above

    return plt


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Loss, components, channel weights and metrics against epoch; written atomically."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    # the optimised loss changes its definition as scale and channel weights move, so its level is not
    # comparable across epochs; the fixed-definition loss is (finest scale, unit channel weights)
    fixed = [h.get("metrics", {}).get("loss_fixed", float("nan")) for h in history]
    ax[0, 0].plot(ep, fixed, "k-o", ms=3, label="test, fixed definition (finest scale, unit weights)")
    ax[0, 0].plot(ep, [h["train_loss"] for h in history], "C0--", label="train, optimised (weights change)")
    ax[0, 0].plot(ep, [h["test_loss"] for h in history], "C1--", label="test, optimised (weights change)")
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_title("loss: compare epochs on the fixed-definition curve")
    ax[0, 0].legend(fontsize=7)
    for ch in CHANNELS:
        ax[0, 1].plot(ep, [h.get("components", {}).get(ch, float("nan")) for h in history], label=ch)
    ax[0, 1].set_yscale("log")
    ax[0, 1].set_title("test loss per channel")
    ax[0, 1].legend(fontsize=7)
    for i, ch in enumerate(CHANNELS):
        ax[1, 0].plot(ep, [h["channel_weights"][i] if h.get("channel_weights") else float("nan") for h in history],
                      label=ch)
    ax[1, 0].set_title("channel weights")
    ax[1, 0].legend(fontsize=7)
    jac = [h.get("metrics", {}).get("jac", float("nan")) for h in history]
    rmse = [h.get("metrics", {}).get("rmse_lat", float("nan")) for h in history]
    ax[1, 1].plot(ep, jac, "C0", label="Jaccard")
    ax[1, 1].set_ylim(0, 1)
    ax[1, 1].set_ylabel("Jaccard")
    twin = ax[1, 1].twinx()
    twin.plot(ep, rmse, "C1", label="RMSE lat (nm)")
    twin.set_ylabel("RMSE lateral (nm)")
    ax[1, 1].set_title("test metrics")
    for a in ax.flat:
        a.set_xlabel("epoch")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)


def _error_histograms(row, tp, tp_match) -> None:
    """dx, dy, dz (nm) and dphot of matched localizations, one histogram each in the axes of ``row``."""
    d = (tp.xyz_nm - tp_match.xyz_nm).numpy()
    for i, name in enumerate(("dx (nm)", "dy (nm)", "dz (nm)")):
        row[i].hist(d[:, i], bins=50)
        row[i].set_title(f"{name}: mean {d[:, i].mean():.1f}, sd {d[:, i].std():.1f}")
    dphot = (tp.phot - tp_match.phot).numpy()
    row[3].hist(dphot, bins=50)
    row[3].set_title(f"dphot: mean {dphot.mean():.0f}, sd {dphot.std():.0f}")


def plot_eval_report(path: Path, matched, gt, em_out, frame_hw, n_frames: int = 4, frame_image=None,
                     image_unit: str = "") -> None:
    """``report.png``: error histograms, predicted vs true positions, Jaccard / RMSE by photon bin.

    ``frame_hw``: frame size (size_x, size_y) in px of the evaluated frames.
    ``frame_image``: optional ``f -> (size_x, size_y)`` array (or None), the camera frame ``f``
    (``image_unit``, e.g. photons or ADU) drawn under the true and predicted positions of the two
    frame panels.
    """
    plt = _plt()
    tp, fp, fn, tp_match = matched
    fig, ax = plt.subplots(2, 4, figsize=(16, 7))
    if len(tp):
        _error_histograms(ax[0], tp, tp_match)
    frames = sorted(set(gt.frame_ix.tolist()))[:n_frames] if len(gt) else []
    for j, f in enumerate(frames[:2]):
        a = ax[1, j]
        g, o = gt[gt.frame_ix == f], em_out[em_out.frame_ix == f]
        hw = frame_hw
        img = frame_image(f) if frame_image is not None else None
        if img is not None:  # pixel (i, j) centred on x = i (down), y = j (right)
            im = a.imshow(np.asarray(img, dtype=np.float32), cmap="gray", interpolation="nearest",
                          extent=(-0.5, hw[1] - 0.5, hw[0] - 0.5, -0.5))
            fig.colorbar(im, ax=a, fraction=0.046, pad=0.02, label=image_unit)
        true_edge = "c" if img is not None else "k"  # visible on a dark frame
        a.scatter(g.xyz_px[:, 1], g.xyz_px[:, 0], s=40, facecolors="none", edgecolors=true_edge, label="true")
        a.scatter(o.xyz_px[:, 1], o.xyz_px[:, 0], s=12, c="r", label="predicted")
        a.set_xlim(-0.5, hw[1] - 0.5)
        a.set_ylim(hw[0] - 0.5, -0.5)
        a.set_title(f"frame {f} (y right, x down; px)")
        a.legend(fontsize=7)
    # Jaccard and lateral RMSE by photon bin of the ground truth
    if len(gt):
        edges = np.quantile(gt.phot.numpy(), np.linspace(0, 1, 7))
        jac, rmse, ctr = [], [], []
        tp_ph, fn_ph = tp_match.phot.numpy(), fn.phot.numpy()
        dlat = ((tp.xyz_nm - tp_match.xyz_nm)[:, :2] ** 2).sum(1).numpy() if len(tp) else np.zeros(0)
        n_fp = len(fp)
        for lo, hi in zip(edges[:-1], edges[1:]):
            in_tp = (tp_ph >= lo) & (tp_ph <= hi)
            in_fn = (fn_ph >= lo) & (fn_ph <= hi)
            share_fp = n_fp * (in_tp.sum() + in_fn.sum()) / max(len(gt), 1)  # fp have no true photons
            denom = in_tp.sum() + in_fn.sum() + share_fp
            jac.append(in_tp.sum() / denom if denom else np.nan)
            rmse.append(np.sqrt(dlat[in_tp].mean()) if in_tp.any() else np.nan)
            ctr.append((lo + hi) / 2)
        ax[1, 2].plot(ctr, jac, "o-")
        ax[1, 2].set_ylim(0, 1)
        ax[1, 2].set_xlabel("true photons")
        ax[1, 2].set_title("Jaccard by photon bin (fp shared pro rata)")
        ax[1, 3].plot(ctr, rmse, "o-")
        ax[1, 3].set_xlabel("true photons")
        ax[1, 3].set_title("lateral RMSE (nm) by photon bin")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=70, format="png"))
    plt.close(fig)
