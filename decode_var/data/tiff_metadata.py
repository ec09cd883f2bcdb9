"""The pixel size a TIFF movie's metadata states: OME-TIFF, Micro-Manager and ImageJ.

Returned in DECODE's order, nm per px along x (rows, the first image axis) and y (columns). Image software
names the axes the other way: OME's and ImageJ's X is the column axis, so OME ``PhysicalSizeY`` / ImageJ
``YResolution`` give DECODE's x. Values outside 1 nm to 100 um per px, and TIFF resolutions without ImageJ's
length unit (a printer's dots per inch), are not taken as a pixel size.
"""
from __future__ import annotations

import logging
import os
import pathlib
import xml.etree.ElementTree as ET
from typing import Optional, Union

import tifffile

from decode_var.data.tiff import TIFF_SUFFIXES, _natural_key

__all__ = ["pixel_size_nm"]

#: nm per unit, for the length units of OME (``PhysicalSizeXUnit``) and ImageJ (``unit``).
NM_PER_UNIT = {"nm": 1.0, "µm": 1e3, "μm": 1e3, "um": 1e3, "micron": 1e3, "microns": 1e3, "\\u00b5m": 1e3,
               "mm": 1e6, "cm": 1e7, "m": 1e9, "å": 0.1, "angstrom": 0.1, "pm": 1e-3}


def _plausible(px) -> Optional[tuple[float, float]]:
    if px is None or any(v is None or not 1.0 <= v <= 1e5 for v in px):
        return None
    return (float(px[0]), float(px[1]))


def _ome(tif: tifffile.TiffFile) -> Optional[tuple[float, float]]:
    root = ET.fromstring(tif.ome_metadata)
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return None

    def size(axis):
        value = pixels.get(f"PhysicalSize{axis}")
        unit = NM_PER_UNIT.get(pixels.get(f"PhysicalSize{axis}Unit", "µm").lower())
        return float(value) * unit if value is not None and unit else None

    return _plausible((size("Y"), size("X")))


def _micromanager(tif: tifffile.TiffFile) -> Optional[tuple[float, float]]:
    tag = tif.pages.first.tags.get(51123)  # MicroManagerMetadata, one JSON per frame
    found = _mm_pixel_size(tag.value if tag is not None else None)
    if found is None:  # the summary in Micro-Manager's file header; tifffile logs a file without one
        logger = logging.getLogger("tifffile")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            found = _mm_pixel_size((tif.micromanager_metadata or {}).get("Summary"))
        except Exception:
            found = None
        finally:
            logger.setLevel(level)
    return found


def _mm_pixel_size(meta) -> Optional[tuple[float, float]]:
    """nm per px from a Micro-Manager metadata dict (``PixelSizeUm`` per frame, ``PixelSize_um`` in the summary)."""
    if not isinstance(meta, dict):
        return None
    for key in ("PixelSizeUm", "PixelSize_um"):
        if meta.get(key):
            um = float(meta[key])
            return _plausible((um * 1e3, um * 1e3))
    return None


def _imagej(tif: tifffile.TiffFile) -> Optional[tuple[float, float]]:
    unit = str((tif.imagej_metadata or {}).get("unit", "")).strip().lower()
    nm = NM_PER_UNIT.get(unit)
    tags = tif.pages.first.tags
    if nm is None or "XResolution" not in tags or "YResolution" not in tags:
        return None

    def per_px(tag):
        num, den = tags[tag].value
        return nm * den / num if num else None

    return _plausible((per_px("YResolution"), per_px("XResolution")))


def _first_tiff(path: pathlib.Path) -> Optional[pathlib.Path]:
    if not path.is_dir():
        return path
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    return files[0] if files else None


def pixel_size_nm(path: Union[str, os.PathLike]) -> Optional[tuple[tuple[float, float], str]]:
    """``((nm along x = rows, nm along y = columns), source)`` from the movie's metadata (a folder: its
    first TIFF file), source one of ``OME-TIFF``, ``Micro-Manager``, ``ImageJ``; None where none states it.
    An unreadable file is None here (reading the frames reports it)."""
    first = _first_tiff(pathlib.Path(path))
    if first is None:
        return None
    try:
        with tifffile.TiffFile(str(first)) as tif:
            readers = [("OME-TIFF", tif.is_ome, _ome), ("Micro-Manager", 51123 in tif.pages.first.tags, _micromanager),
                       ("ImageJ", tif.is_imagej, _imagej)]
            for source, present, read in readers:
                px = read(tif) if present else None
                if px is not None:
                    return px, source
    except Exception:  # tifffile and ElementTree raise many kinds; the frames' reader names the problem
        return None
    return None

