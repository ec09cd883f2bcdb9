"""Emitter files in DECODE 0.10's formats (.csv, .h5/.hdf5, .pt), written atomically.

Files written here load with DECODE's ``decode.utils.emitter_io.load_h5 / load_csv / load_torch`` and
``EmitterSet.load``, and files written by DECODE load here:

- **h5**: group ``meta`` (attrs ``xy_unit``, ``px_size``), group ``decode`` (attr ``version``), group
  ``data`` with datasets xyz, xyz_sig, xyz_cr, phot, phot_cr, phot_sig, frame_ix, id, prob, bg, bg_cr,
  bg_sig. An all-nan optional field is stored as an empty dataset (``h5py.Empty('f')``), as DECODE does.
- **csv**: three comment lines ``# DECODE EmitterSet``, ``# {decode meta json}``, ``# {emitter meta
  json}``, then a header and one row per emitter with the columns x, y, z, phot, frame_ix, id, prob,
  bg, phot_cr, bg_cr, phot_sig, bg_sig, x_cr, y_cr, z_cr, x_sig, y_sig, z_sig.
- **pt**: ``torch.save({'data': {...}, 'meta': {'xy_unit', 'px_size'}, 'decode': {'version'}})``.

**The data behind the emitters** (``source``: the frames file, frames read, frame shape, frames fitted,
excluded by kind, localizations dropped; see :meth:`decode_var.inference.stack.StackReport.meta`) is
stored with DECODE's own metadata, which DECODE's ``EmitterSet.load`` ignores (extra keys in ``meta``
would reach its constructor): attrs of the h5 group ``decode``, the csv's decode json line, the pt's
``decode`` dict. :func:`load_source_meta` reads it back (``{}`` for files without it).

Unset fields are written as DECODE's EmitterSet fills them: prob 1, id -1 (ours keeps its ids), bg,
CRLBs and sigmas nan.

Plain CSV ground truth (no ``#`` metadata lines) is accepted too: a header with at least
``frame_ix, x, y, phot`` and optionally ``z`` (default 0) and ``id``, and any of the columns above.
Units: frame_ix 0-based; x, y in px with pixel i centred on i (DECODE's frame convention) unless
``xy_unit='nm'`` is passed; z in nm; phot in photons; bg in photons / px.
"""
from __future__ import annotations

import csv
import io
import json
import math
import pathlib
from typing import Optional, Sequence, Union

import h5py
import numpy as np
import torch

from decode_var.core.atomic import atomic_write
from decode_var.core.emitters import EmitterSet
from decode_var.core.errors import DecodeVarError, InputDataError
from decode_var.core.version import __version__

__all__ = ["save_emitters", "load_emitters", "load_source_meta", "SUFFIXES"]

SUFFIXES = (".csv", ".h5", ".hdf5", ".pt")
_REQUIRED = ("frame_ix", "x", "y", "phot")
_VOLATILE = ("xyz_sig", "xyz_cr", "phot_cr", "phot_sig", "bg_cr", "bg_sig")
_CSV_COLUMNS = ("x", "y", "z", "phot", "frame_ix", "id", "prob", "bg", "phot_cr", "bg_cr", "phot_sig", "bg_sig",
                "x_cr", "y_cr", "z_cr", "x_sig", "y_sig", "z_sig")
_INT_COLUMNS = ("frame_ix", "id")


def _version() -> str:
    return f"decode-var-{__version__}"


def _filled(em: EmitterSet) -> dict:
    """All of DECODE's data fields as CPU tensors, unset ones filled the way DECODE's EmitterSet does."""
    n = len(em)
    nan1 = torch.full((n,), math.nan)
    nan3 = torch.full((n, 3), math.nan)

    def get(name, default):
        v = getattr(em, name)
        return default.clone() if v is None else v.detach().cpu().float()

    return {
        "xyz": em.xyz.detach().cpu().float(),
        "phot": em.phot.detach().cpu().float(),
        "frame_ix": em.frame_ix.detach().cpu().long(),
        "id": em.id.detach().cpu().long(),
        "prob": get("prob", torch.ones(n)),
        "bg": get("bg", nan1),
        "xyz_cr": get("xyz_cr", nan3),
        "phot_cr": get("phot_cr", nan1),
        "bg_cr": get("bg_cr", nan1),
        "xyz_sig": get("xyz_sig", nan3),
        "phot_sig": get("phot_sig", nan1),
        "bg_sig": get("bg_sig", nan1),
    }


def _meta(em: EmitterSet) -> dict:
    return {"xy_unit": em.xy_unit,
            "px_size": None if em.px_size is None else [float(v) for v in em.px_size.reshape(-1)]}


# saving -------------------------------------------------------------------------------------------
def save_emitters(path: Union[str, pathlib.Path], em: EmitterSet, source: Optional[dict] = None) -> pathlib.Path:
    """Write ``em`` to ``path`` (.csv, .h5/.hdf5 or .pt, chosen by the suffix) atomically.

    ``source``: what the emitters come from (str, int, or lists of int / str values), stored next to the
    decode version (see the module's docstring)."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    writers = {".csv": _write_csv, ".h5": _write_h5, ".hdf5": _write_h5, ".pt": _write_pt}
    if suffix not in writers:
        raise InputDataError(f"Cannot save emitters to {path}: unknown suffix {path.suffix!r}. "
                             f"Use one of {', '.join(SUFFIXES)}.")
    data, meta = _filled(em), _meta(em)
    decode_meta = {**(source or {}), "version": _version()}
    return atomic_write(path, lambda tmp: writers[suffix](tmp, data, meta, decode_meta))


def _write_h5(tmp: pathlib.Path, data: dict, meta: dict, decode_meta: dict) -> None:
    with h5py.File(tmp, "w") as f:
        m = f.create_group("meta")
        m.attrs["xy_unit"] = meta["xy_unit"]
        # DECODE refuses to write px_size None to hdf5; leaving the attribute out loads as None instead
        if meta["px_size"] is not None:
            m.attrs["px_size"] = np.asarray(meta["px_size"], dtype=np.float32)
        d = f.create_group("decode")
        for key, value in decode_meta.items():
            d.attrs[key] = np.asarray(value, dtype=np.int64) if isinstance(value, list) and \
                all(isinstance(v, int) for v in value) else value
        g = f.create_group("data")
        for key in ("xyz", "xyz_sig", "xyz_cr", "phot", "phot_cr", "phot_sig", "frame_ix", "id", "prob", "bg",
                    "bg_cr", "bg_sig"):
            value = data[key]
            if key in _VOLATILE and bool(torch.isnan(value).all()):
                g.create_dataset(key, data=h5py.Empty("f"))
            else:
                g.create_dataset(key, data=value.numpy())


def _write_pt(tmp: pathlib.Path, data: dict, meta: dict, decode_meta: dict) -> None:
    px = None if meta["px_size"] is None else torch.tensor(meta["px_size"], dtype=torch.float32)
    # through a Python file: the zip archive inside is then named 'archive', not after the temporary file,
    # so the same emitters give the same bytes (a resumed fit, decode_var.inference.blocks), and a full disk
    # is an OSError (ENOSPC), not torch's "unexpected pos"
    with open(tmp, "wb") as f:
        torch.save({"data": data, "meta": {"xy_unit": meta["xy_unit"], "px_size": px}, "decode": decode_meta}, f)


def _csv_columns(data: dict) -> dict:
    cols = {"x": data["xyz"][:, 0], "y": data["xyz"][:, 1], "z": data["xyz"][:, 2]}
    for k in ("phot", "frame_ix", "id", "prob", "bg", "phot_cr", "bg_cr", "phot_sig", "bg_sig"):
        cols[k] = data[k]
    for i, ax in enumerate("xyz"):
        cols[f"{ax}_cr"] = data["xyz_cr"][:, i]
    for i, ax in enumerate("xyz"):
        cols[f"{ax}_sig"] = data["xyz_sig"][:, i]
    return cols


def _write_csv(tmp: pathlib.Path, data: dict, meta: dict, decode_meta: dict) -> None:
    cols = _csv_columns(data)
    table = np.stack([cols[c].double().numpy() for c in _CSV_COLUMNS], 1) if len(data["xyz"]) else \
        np.zeros((0, len(_CSV_COLUMNS)))
    # 9 significant digits round-trip float32 exactly
    fmt = ["%d" if c in _INT_COLUMNS else "%.9g" for c in _CSV_COLUMNS]
    with open(tmp, "w", newline="") as f:
        f.write("# DECODE EmitterSet\n")
        f.write(f"# {json.dumps(decode_meta)}\n")
        f.write(f"# {json.dumps(meta)}\n")
        f.write(",".join(_CSV_COLUMNS) + "\n")
        np.savetxt(f, table, fmt=fmt, delimiter=",")


# loading ------------------------------------------------------------------------------------------
def load_emitters(path: Union[str, pathlib.Path], xy_unit: Optional[str] = None,
                  px_size: Optional[Sequence[float]] = None) -> EmitterSet:
    """Read an EmitterSet from .csv, .h5/.hdf5 or .pt.

    Args:
        path: the file.
        xy_unit: unit of x, y for files without metadata (plain csv); default 'px'. Metadata in the file
            takes precedence.
        px_size: (2,) nm / px, used where the file has none.

    Raises:
        InputDataError: missing, unreadable or malformed file (the message names the file and what is
            missing).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputDataError(f"Emitter file {path} does not exist (or is not a file).")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".h5": _read_h5, ".hdf5": _read_h5, ".pt": _read_pt}
    if suffix not in readers:
        raise InputDataError(f"Cannot read emitters from {path}: unknown suffix {path.suffix!r}. "
                             f"Use one of {', '.join(SUFFIXES)}.")
    try:
        data, meta = readers[suffix](path)
        return _build(path, data, meta, xy_unit, px_size)
    except DecodeVarError as err:
        if str(path) in str(err):
            raise
        raise InputDataError(f"Emitter file {path}: {err}") from err


def load_source_meta(path: Union[str, pathlib.Path]) -> dict:
    """What :func:`save_emitters` stored as ``source`` (e.g. ``n_frames``, ``frame_shape``), as plain
    Python values; ``{}`` for a file without it (older files, DECODE's own)."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            meta = dict(f["decode"].attrs) if "decode" in f else {}
    elif suffix == ".pt":
        meta = torch.load(path, map_location="cpu", weights_only=True).get("decode") or {}
    elif suffix == ".csv":
        with open(path) as f:
            lines = [f.readline() for _ in range(3)]
        meta = {}
        if lines[0].startswith("# DECODE EmitterSet") and lines[1].startswith("# {"):
            meta = json.loads(lines[1][1:])
    else:
        raise InputDataError(f"Cannot read emitters from {path}: unknown suffix {path.suffix!r}.")
    meta = {k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
            for k, v in meta.items() if k != "version"}
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in meta.items()}


def _build(path, data: dict, meta: dict, xy_unit, px_size) -> EmitterSet:
    missing = [k for k in ("xyz", "phot", "frame_ix") if data.get(k) is None]
    if missing:
        raise InputDataError(f"Emitter file {path} lacks the fields {missing} (needs xyz, phot, frame_ix).")
    meta = meta or {}
    unit = meta.get("xy_unit") or xy_unit or "px"
    if isinstance(unit, bytes):
        unit = unit.decode()
    if unit not in ("px", "nm"):
        raise InputDataError(f"Emitter file {path} has xy_unit {unit!r}; expected 'px' or 'nm'.")
    size = meta.get("px_size")
    if size is None:
        size = px_size
    xyz = torch.as_tensor(np.asarray(data["xyz"]), dtype=torch.float32)
    if xyz.dim() != 2 or xyz.size(1) not in (2, 3):
        raise InputDataError(f"Emitter file {path}: xyz has shape {tuple(xyz.shape)}, expected (E, 3).")
    n = xyz.size(0)
    kw = {}
    for k in ("id", "prob", "bg", "xyz_cr", "phot_cr", "bg_cr", "xyz_sig", "phot_sig", "bg_sig"):
        v = data.get(k)
        if v is not None:
            kw[k] = torch.as_tensor(np.asarray(v))
    for k, v in list(kw.items()) + [("phot", data["phot"]), ("frame_ix", data["frame_ix"])]:
        if len(v) != n:
            raise InputDataError(f"Emitter file {path}: field {k!r} has {len(v)} rows but xyz has {n}.")
    frame_ix = torch.as_tensor(np.asarray(data["frame_ix"]))
    if frame_ix.is_floating_point():
        if not bool(torch.isfinite(frame_ix).all()) or bool((frame_ix != frame_ix.round()).any()):
            raise InputDataError(f"Emitter file {path}: frame_ix must be whole numbers without gaps (nan).")
    if "id" in kw and kw["id"].is_floating_point():
        kw["id"] = torch.nan_to_num(kw["id"], nan=-1.0)
    if "id" in kw:
        kw["id"] = kw["id"].long()
    return EmitterSet(xyz, torch.as_tensor(np.asarray(data["phot"])), frame_ix.long(), xy_unit=unit,
                      px_size=None if size is None else [float(v) for v in np.asarray(size).reshape(-1)], **kw)


def _read_h5(path: pathlib.Path):
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputDataError(f"Emitter file {path} is not a readable HDF5 file ({err}).") from err
    with f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise InputDataError(f"Emitter file {path} has no 'data' group: not an EmitterSet file "
                                 "written by DECODE or decode-var.")
        missing = [k for k in ("xyz", "phot", "frame_ix") if k not in f["data"]]
        if missing:
            raise InputDataError(f"Emitter file {path} lacks the datasets {missing} in group 'data'.")
        data = {}
        for k, ds in f["data"].items():
            data[k] = None if ds.shape is None else ds[()]
        meta = dict(f["meta"].attrs) if "meta" in f else {}
    return data, meta


def _read_pt(path: pathlib.Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        raise InputDataError(f"Emitter file {path} is not a readable torch file ({type(err).__name__}: "
                             f"{err}).") from err
    if not isinstance(obj, dict):
        raise InputDataError(f"Emitter file {path} holds a {type(obj).__name__}, expected a dict with 'data' "
                             "and 'meta' as DECODE's save_torch writes.")
    data = obj.get("data", obj)
    meta = obj.get("meta") or {}
    if not isinstance(data, dict):
        raise InputDataError(f"Emitter file {path}: 'data' is a {type(data).__name__}, expected a dict.")
    data = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
    if isinstance(meta.get("px_size"), torch.Tensor):
        meta = dict(meta, px_size=meta["px_size"].numpy())
    return data, meta


def _read_csv(path: pathlib.Path):
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputDataError(f"Emitter file {path} cannot be read as text ({err}).") from err
    lines = text.splitlines()
    meta, start = {}, 0
    while start < len(lines) and lines[start].lstrip().startswith("#"):
        body = lines[start].lstrip().lstrip("#").strip()
        if body.startswith("{"):
            try:
                parsed = json.loads(body)
            except json.JSONDecodeError as err:
                raise InputDataError(f"Emitter file {path}, line {start + 1}: metadata is not valid JSON "
                                     f"({err}).") from err
            if isinstance(parsed, dict) and "xy_unit" in parsed:
                meta = parsed
        start += 1
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise InputDataError(f"Emitter file {path} has no header line; expected columns "
                             f"{', '.join(_REQUIRED)} (+ z, id, ...).")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise InputDataError(f"Emitter file {path} lacks the columns {missing}; found {header}. Needs "
                             f"{', '.join(_REQUIRED)} (z and id optional).")
    body = rows[1:]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise InputDataError(f"Emitter file {path}: row {i + 1} after the header has {len(r)} fields, "
                                 f"the header has {len(header)}.")
    table = np.array(body, dtype=str).reshape(len(body), len(header))
    table = np.char.strip(table)
    table[table == ""] = "nan"
    try:
        values = table.astype(np.float64)
    except ValueError as err:
        raise InputDataError(f"Emitter file {path} holds a value that is not a number ({err}).") from err
    col = {h: values[:, i] for i, h in enumerate(header)}
    n = values.shape[0]
    z = col.get("z", np.zeros(n))
    data = {"xyz": np.stack([col["x"], col["y"], z], 1).astype(np.float32),
            "phot": col["phot"].astype(np.float32), "frame_ix": col["frame_ix"]}
    if "id" in col:
        data["id"] = col["id"]
    for k in ("prob", "bg"):
        if k in col:
            data[k] = col[k].astype(np.float32)
    # as in DECODE's h5 files, an all-nan uncertainty column means "not set"
    for k in ("phot_cr", "bg_cr", "phot_sig", "bg_sig"):
        if k in col and not np.isnan(col[k]).all():
            data[k] = col[k].astype(np.float32)
    for k in ("cr", "sig"):
        names = [f"{a}_{k}" for a in "xyz"]
        if all(c in col for c in names) and not np.isnan(np.stack([col[c] for c in names])).all():
            data[f"xyz_{k}"] = np.stack([col[c] for c in names], 1).astype(np.float32)
    return data, meta
