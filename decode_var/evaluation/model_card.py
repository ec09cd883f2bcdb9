"""The model card: what a model was trained for and how well it localizes, next to its ``model.pt``.

``model.pt`` stays a plain state dict (DECODE's LoadSaveModel format), so this lives in a JSON sidecar,
``<exp>/model_card.json``, written atomically by the trainer with every ``model.pt`` (and refreshed by
``decode-var-eval`` on the default test set)::

    {"format": 1,
     "camera": {"em_gain": 300.0, "e_per_adu": 45.0, "baseline": 100.0, "qe": 1.0, "read_sigma": 74.4,
                "spur_noise": 0.0015, "convert2photons": true, "px_size": [100.0, 100.0]},
     "precision": {"ratio_x": 1.83, "ratio_y": 1.91, "ratio_z": 2.4, "ratio_lat": 1.87, "n_matched": 412,
                   "epoch": 7, "measured_by": "decode-var-train"}}

``camera``: the training param's ``Camera`` section. ``precision``: RMSE / sqrt(mean CRLB) along DECODE's x
(rows), y (columns), z and laterally, on the model's own seeded test set
(:func:`~decode_var.evaluation.crlb_scoring.precision_calibration`): the factor by which the model's
localizations are worse than the bound, used to export honest precisions (``decode_var.inference.export``).
``epoch`` counts from 1 (the epochs trained); ``null`` where unknown. A ratio is ``null`` where not measured.

A model that predicts its own sigma (``VAR.model.uncertainty``) has one more entry, ``"sigma"``
(:class:`SigmaCalibration`): the post-hoc factors on its sigmas of phot, x, y, z (they are also in ``model.pt``,
the model's ``sigma_scale``, where they apply), fitted on a held-out simulated set so that 68.3 % of the matched
localizations lie within +-1 sigma, and the share within +-1 sigma before (``cover_*_raw``) and after
(:func:`decode_var.evaluation.uncertainty.calibrate_sigma`). Cards without it stay as they were.

It lives in ``evaluation`` (not ``inference``) because the trainer writes it and may import only lower layers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

from decode_var.core.atomic import atomic_write_text
from decode_var.core.log import note, warn
from decode_var.evaluation.crlb_scoring import precision_calibration

__all__ = ["CARD_NAME", "CAMERA_KEYS", "ModelCard", "PrecisionCalibration", "SigmaCalibration", "card_path",
           "camera_of", "load_card",
           "update_card", "camera_mismatches", "check_camera", "refresh_card"]

CARD_NAME = "model_card.json"
#: the ``Camera`` keys a model is trained for (its noise model and units)
CAMERA_KEYS = ("em_gain", "e_per_adu", "baseline", "qe", "read_sigma", "spur_noise", "convert2photons", "px_size",
               "offset_map", "gain_map", "read_var_map")  # the maps by file name; roi_origin may differ at fit time
FORMAT = 1


@dataclass
class PrecisionCalibration:
    """RMSE / sqrt(mean CRLB) per axis (DECODE's x = rows, y, z; lateral) on the model's test set."""

    ratio_x: Optional[float]
    ratio_y: Optional[float]
    ratio_z: Optional[float]
    ratio_lat: Optional[float]
    n_matched: int
    epoch: Optional[int] = None
    measured_by: str = "decode-var-train"

    def ratios(self) -> tuple:
        """(3,) factors for DECODE x, y, z; None where not measured (an unknown x or y takes the lateral one)."""
        x = self.ratio_x if _finite(self.ratio_x) else (self.ratio_lat if _finite(self.ratio_lat) else None)
        y = self.ratio_y if _finite(self.ratio_y) else (self.ratio_lat if _finite(self.ratio_lat) else None)
        return x, y, (self.ratio_z if _finite(self.ratio_z) else None)


@dataclass
class SigmaCalibration:
    """Post-hoc factors on a model's predicted sigmas of phot, x, y, z (DECODE's x = rows), fitted on held-out
    simulated sets (at ``densities`` emitters per frame): from the 68.27 % quantile of |error| / sigma of the matched
    localizations; the share within +-1 sigma before (``cover_*_raw``) and after, on those sets."""

    scale_phot: float
    scale_x: float
    scale_y: float
    scale_z: float
    cover_x_raw: Optional[float]
    cover_y_raw: Optional[float]
    cover_z_raw: Optional[float]
    cover_x: Optional[float]
    cover_y: Optional[float]
    cover_z: Optional[float]
    n_matched: int
    epoch: Optional[int] = None
    measured_by: str = "decode-var-train"
    densities: Optional[list] = None  #: emitters per frame of the held-out sets

    def scales(self) -> tuple:
        """(4,) factors for phot, x, y, z."""
        return self.scale_phot, self.scale_x, self.scale_y, self.scale_z


@dataclass
class ModelCard:
    """A model's camera (the training param's ``Camera`` values), precision calibration and, for a model that
    predicts its sigma, the sigma calibration; ``path``: its file."""

    camera: dict
    precision: Optional[PrecisionCalibration] = None
    path: Optional[Path] = None
    sigma: Optional[SigmaCalibration] = None

    def to_json(self) -> str:
        precision = None if self.precision is None else {k: _plain(v) for k, v in asdict(self.precision).items()}
        card = {"format": FORMAT, "camera": {k: _plain(v) for k, v in self.camera.items()}, "precision": precision}
        if self.sigma is not None:
            card["sigma"] = {k: _plain(v) for k, v in asdict(self.sigma).items()}
        return json.dumps(card, indent=1, allow_nan=False)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(v):
    """JSON-safe: non-finite floats as null, tuples as lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def card_path(model_path: Union[str, Path]) -> Path:
    """``model_card.json`` in the folder of ``model_path`` (a model file, or the experiment folder itself)."""
    model_path = Path(model_path)
    return (model_path if model_path.is_dir() else model_path.parent) / CARD_NAME


def camera_of(param) -> dict:
    """The param's ``Camera`` values the card records (``CAMERA_KEYS``)."""
    cam = param.Camera
    return {k: _plain(list(getattr(cam, k)) if k == "px_size" and getattr(cam, k) is not None else getattr(cam, k))
            for k in CAMERA_KEYS}


def load_card(model_path: Union[str, Path]) -> Optional[ModelCard]:
    """The card next to ``model_path``; None when there is none (older models). A damaged card is reported
    and ignored: it must not stop a fit."""
    path = card_path(model_path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        precision = raw.get("precision")
        precision = None if precision is None else PrecisionCalibration(**precision)
        sigma = raw.get("sigma")
        return ModelCard(dict(raw["camera"]), precision, path, None if sigma is None else SigmaCalibration(**sigma))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warn(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}); the model's camera is not checked and "
             "exported precisions are not calibrated. Rewrite it with decode-var-eval on the model's param.")
        return None


def update_card(model_path: Union[str, Path], camera: dict, precision: Optional[dict] = None,
                epoch: Optional[int] = None, measured_by: str = "decode-var-train",
                sigma: Optional[SigmaCalibration] = None) -> Path:
    """Write the card next to ``model_path`` (atomically): ``camera`` (the training param's, :func:`camera_of`)
    and, when given, the precision calibration (``precision_calibration``'s dict) measured at ``epoch`` and the
    sigma calibration; each one not given is kept from the card's earlier version."""
    old = load_card(model_path)
    if precision is not None:
        calib = PrecisionCalibration(**precision, epoch=epoch, measured_by=measured_by)
    else:
        calib = old.precision if old is not None else None
    if sigma is None and old is not None:
        sigma = old.sigma
    return atomic_write_text(card_path(model_path), ModelCard(dict(camera), calib, sigma=sigma).to_json())


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a, b = list(a) if isinstance(a, (list, tuple)) else [a], list(b) if isinstance(b, (list, tuple)) else [b]
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return a == b


def camera_mismatches(card: ModelCard, now: dict) -> list[tuple]:
    """(key, trained value, this param's value) of each ``Camera`` key that differs (keys the card has); ``now``:
    this param's camera (:func:`camera_of`)."""
    return [(k, card.camera[k], now[k]) for k in CAMERA_KEYS if k in card.camera and not _same(card.camera[k], now[k])]


def check_camera(camera: dict, model_path: Union[str, Path]) -> Optional[ModelCard]:
    """Load the card next to ``model_path`` and warn, for each ``Camera`` key, where ``camera`` (this param's,
    :func:`camera_of`) differs from the
    camera the model was trained for. Returns the card (None without one: nothing is said about the camera)."""
    card = load_card(model_path)
    if card is None:
        return None
    for key, trained, now in camera_mismatches(card, camera):
        warn(f"Camera.{key}: the model was trained with {trained}, this param says {now} ({card.path}). A model "
             "knows only the noise and units of its training camera: fit frames of that camera with its values, "
             "or retrain for this one.")
    return card


def refresh_card(model_path: Union[str, Path], camera: dict, metrics: dict) -> Optional[Path]:
    """``decode-var-eval`` on the default (seeded) test set: the card's precision calibration again, from the
    scored test set's ``metrics`` (:meth:`decode_var.evaluation.protocol.Protocol.score`). Skipped, with a note,
    when ``camera`` (this param's, :func:`camera_of`) is not the card's (the test set then is not the model's
    own). Returns the card written, or None."""
    card = load_card(model_path)
    if card is not None and camera_mismatches(card, camera):
        note(f"{card.path} not refreshed: this param's camera is not the one the model was trained for.")
        return None
    calib = precision_calibration(metrics)
    if calib is None:
        return None
    try:
        return update_card(model_path, camera, calib, epoch=None, measured_by="decode-var-eval")
    except OSError as err:  # e.g. a read-only model folder: the evaluation itself stands
        warn(f"{card_path(model_path)} not refreshed: {err}")
        return None
