"""Load, fill, validate and save DECODE-format param files with the plugin's ``VAR:`` section.

Loading follows DECODE 0.10 (``decode.utils.param_io``): the user's file is filled with the
reference defaults key by key, unknown keys of DECODE's sections are kept, and the derived
``Scaling`` values are set as DECODE's ``autoset_scaling`` does. On top of that every value the
plugin reads is validated, and every problem is one :class:`~decode_var.core.errors.ParamError` that
names the key and the fix.

The file must mean what the user wrote: an empty file and a key given twice (at any depth) are errors,
and a key of DECODE's sections that neither DECODE nor decode-var reads is warned about ("did you mean").

The loaded object is a :class:`Param` namespace (``param.HyperParameter.batch_size``), which is
what DECODE's own ``parse(param)`` classmethods expect. Our ``parse(param)`` methods also take DECODE's
own loaded param (:func:`as_param`).
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Union

import yaml

from decode_var.core.atomic import atomic_write_text
from decode_var.core.errors import ParamError
from decode_var.core.log import warn
from decode_var.core.scales import ScaleSchedule

#: Sections in which unknown keys are errors (the plugin owns them).
STRICT_SECTIONS = ("VAR",)

#: Keys of DECODE's sections that DECODE reads but decode-var does not (DECODE 0.10.2's reference.yaml, and keys
#: its code reads beyond it): kept without a warning. Any other unknown key of a DECODE section is warned about.
DECODE_ONLY_KEYS = {
    "Camera": ("mirror_dim",),
    "Hardware": ("torch_multiprocessing_sharing_strategy", "device_ix"),
    "HyperParameter": ("auto_restart_param", "disabled_attributes", "ds_lifetime", "epoch_0", "fgbg_factor",
                       "photon_threshold", "target_train_rim"),
    "InOut": ("model_out",),
    "PostProcessingParam": ("ax_th", "lat_th", "match_dims", "single_val_th", "total_th", "vol_th"),
    "Scaling": ("dx_max", "dy_max", "linearisation_buffer", "mu_sig_bg"),
    "Simulation": ("photon_range",),
}

#: ``HyperParameter.arch_param.initial_features`` of DECODE 0.10.2's reference (filled by its ``load_params``).
DECODE_ARCH_FEATURES = 48

#: Keys where empty (null) is a choice, not "unset": kept when a DECODE-loaded param is adapted (:func:`as_param`).
EMPTY_IS_A_CHOICE = ("Camera.em_gain", "HyperParameter.emitter_label_photon_min", "PostProcessing")

#: Number keys that also take a list: a range [low, high] drawn per sample, or one value per Perlin scale.
NUMBER_OR_LIST = ("Simulation.emitter_av", "Simulation.bg_perlin_scale")


class ParamKeyError(ParamError, AttributeError):
    """A key that is read does not exist (an AttributeError too, so ``getattr(p, k, default)`` works)."""


_RESERVED = frozenset({"keys", "get", "to_dict"})


class Param:
    """Attribute-access view of a nested dict (DECODE's ``RecursiveNamespace`` convention)."""

    def __init__(self, _path: str = "", **entries):
        object.__setattr__(self, "_path", _path)
        self._fill(entries)

    @classmethod
    def from_dict(cls, data: dict, path: str = "") -> "Param":
        """Like ``Param(**data)``, for any dict (a key named like an argument is refused, not a TypeError)."""
        out = cls(path)
        out._fill(data)
        return out

    def _fill(self, entries: dict) -> None:
        _path = self._path
        where = f"section '{_path}'" if _path else "the top level"
        for key, value in entries.items():
            if not isinstance(key, str):
                raise ParamError(f"Param key {key!r} at {where} is not text. Write it as a name (a YAML string key).")
            if key.startswith("_") or key in _RESERVED:
                raise ParamError(f"Param key '{key}' at {where} is not allowed: keys starting with '_' and the names "
                                 f"{', '.join(sorted(_RESERVED))} are reserved. Rename or remove it.")
            object.__setattr__(self, key, self._wrap(value, f"{_path}.{key}" if _path else key))

    @staticmethod
    def _wrap(value, path):
        if isinstance(value, dict):
            return Param.from_dict(value, path)
        return value

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        where = self._path or "the param file"
        raise ParamKeyError(f"{where} has no key '{key}'. Add it to the param file "
                            f"(see param/reference.yaml for every key and its default).")

    def __setattr__(self, key, value):
        object.__setattr__(self, key, self._wrap(value, f"{self._path}.{key}" if self._path else key))

    def __contains__(self, key):
        return key in self.__dict__ and key != "_path"

    def keys(self):
        return [k for k in self.__dict__ if k != "_path"]

    def get(self, key, default=None):
        return self.__dict__.get(key, default) if key != "_path" else default

    def to_dict(self) -> dict:
        out = {}
        for k in self.keys():
            v = self.__dict__[k]
            out[k] = v.to_dict() if isinstance(v, Param) else copy.deepcopy(v)
        return out

    def __repr__(self):
        return f"Param({self.to_dict()!r})"

    def __eq__(self, other):
        return isinstance(other, Param) and self.to_dict() == other.to_dict()


def load_reference() -> dict:
    """The reference defaults shipped with the package (``decode_var/config/reference.yaml``); a fresh copy."""
    return copy.deepcopy(_reference())


@functools.lru_cache(maxsize=1)
def _reference() -> dict:
    text = resources.files("decode_var.config").joinpath("reference.yaml").read_text()
    return yaml.safe_load(text)


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_type(path: str, value, ref) -> None:
    """The user's value must have the reference's kind (number, bool, str, list, section)."""
    if ref is None or value is None:
        return
    if isinstance(ref, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif _is_number(ref) and path in NUMBER_OR_LIST:
        ok, kind = _is_number(value) or isinstance(value, (list, tuple)), "a number or a list of numbers"
    elif _is_number(ref):
        ok, kind = _is_number(value), "a number"
    elif isinstance(ref, str) and ref == "auto":  # auto, or an explicit choice (e.g. VAR.train.prefetch: true)
        return
    elif isinstance(ref, str):
        # some string keys also take a list (e.g. VAR.loss.channel_weights: preset or 6 numbers)
        ok, kind = isinstance(value, (str, list)), "a name"
    elif isinstance(ref, list):
        ok, kind = isinstance(value, (list, tuple)) or _is_number(value), "a list"
    elif isinstance(ref, dict):
        ok, kind = isinstance(value, dict), "a section (mapping)"
    else:
        return
    if not ok:
        raise ParamError(f"{path} must be {kind}, got {value!r} ({type(value).__name__}). "
                         f"The default is {ref!r}.")


def autofill(user: dict, reference: dict, path: str = "") -> dict:
    """Fill ``user`` with the reference's keys, recursively; keep unknown keys of DECODE sections.

    Unknown keys inside :data:`STRICT_SECTIONS` raise :class:`ParamError` with the nearest name.
    """
    out = {}
    strict = path.split(".")[0] in STRICT_SECTIONS if path else False
    for key, value in user.items():
        if key not in reference:
            where = f"{path}.{key}" if path else str(key)
            if strict:
                raise ParamError(f"Unknown key {where}.{_suggest(key, reference)} "
                                 f"Known keys of {path}: {', '.join(map(str, reference))}.")
            if not path and not isinstance(value, (dict, str, type(None))):
                raise ParamError(f"Top-level key '{key}' must be a section, got {value!r}.")
            out[key] = copy.deepcopy(value)
    for key, ref in reference.items():
        where = f"{path}.{key}" if path else key
        if key in user:
            value = user[key]
            if isinstance(ref, dict) and value is None:
                value = {}
            _check_type(where, value, ref)
            if isinstance(ref, dict) and ref:
                out[key] = autofill(value, ref, where)
            else:
                out[key] = copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(ref)
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice, at any depth (YAML would keep the last)."""

    def construct_document(self, node):
        self._check_unique_keys(node)
        return super().construct_document(node)

    def _check_unique_keys(self, root) -> None:
        todo, seen_nodes = [(root, "")], set()
        while todo:  # iterative: deep nesting and aliases (a node reached twice) are fine
            node, where = todo.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                todo.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                lines = {}
                for key_node, value_node in node.value:
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                    path = f"{where}.{name}" if where else str(name)
                    if name is not None and key_node.tag != "tag:yaml.org,2002:merge":
                        key = (key_node.tag, name)
                        if key in lines:
                            raise _DuplicateKey(path, lines[key], key_node.start_mark.line + 1)
                        lines[key] = key_node.start_mark.line + 1
                    todo.append((value_node, path))


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ParamError(f"Param file {path} does not exist. Start from param/var_quickstart.yaml.")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ParamError(f"Param file {path} must end in .yaml, .yml or .json.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ParamError(f"Param file {path} cannot be read ({err}). Check the path and permissions.") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ParamError(f"Param file {path} gives the key {dup.key} twice (line {dup.first} and line {dup.again}); "
                         f"YAML would silently keep the last. Keep one of them.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamError(f"Param file {path} is not valid YAML{where}: "
                         f"{getattr(err, 'problem', err)}. Fix the syntax (indentation, colons).") from None
    if data is None or data == {}:
        raise ParamError(f"Param file {path} is empty: it sets nothing, so a run would silently use every default. "
                         f"Start from param/var_quickstart.yaml, or write the sections you mean.")
    if not isinstance(data, dict):
        raise ParamError(f"Param file {path} must hold sections (a mapping), got {type(data).__name__}.")
    return data


def load_param(path: Union[str, Path], overrides: dict | None = None) -> Param:
    """Read a param file, fill defaults, derive ``Scaling``, validate. Raises :class:`ParamError`."""
    data = _read_yaml(Path(path))
    for key, hint in unknown_decode_keys(data):
        if (str(Path(path).resolve()), key) not in _WARNED:  # a CLI may load its param twice (fit: frames, export)
            _WARNED.add((str(Path(path).resolve()), key))
            warn(f"{path}: {key} is not a key that DECODE or decode-var reads; it is kept but has no effect.{hint}")
    return param_from_dict(data, overrides=overrides, source=str(path))


#: (param file, key) already warned about in this process.
_WARNED: set = set()


def unknown_decode_keys(data: dict) -> list[tuple[str, str]]:
    """``[(Section.key, " Did you mean ...?"), ...]``: keys of DECODE's sections that nobody reads (misspelt?).

    Unknown top-level sections stay tolerated, as DECODE does; unknown ``VAR`` keys are errors
    (:func:`autofill`), so only DECODE's own sections are looked at here, one level deep.
    """
    found = []
    for section, ref in _reference().items():
        user = data.get(section)
        if section in STRICT_SECTIONS or not isinstance(ref, dict) or not isinstance(user, dict):
            continue
        known = list(ref) + list(DECODE_ONLY_KEYS.get(section, ()))
        found += [(f"{section}.{key}", _suggest(key, known)) for key in user if key not in known]
    return found


def param_from_dict(data: dict, overrides: dict | None = None, source: str = "param") -> Param:
    """Same as :func:`load_param`, from a dict (tests, programmatic use)."""
    if not isinstance(data, dict):
        raise ParamError(f"{source} must be a mapping of sections, got {type(data).__name__}.")
    data = copy.deepcopy(data)
    if overrides:
        _deep_update(data, overrides)
    if "VAR" in data and data["VAR"] is None:
        data["VAR"] = {}
    filled = autofill(data, load_reference())
    param = Param.from_dict(filled)
    autoset_scaling(param)
    validate(param)
    return param


def as_param(param) -> Param:
    """The validated :class:`Param` for any param a ``parse(param)`` classmethod is given.

    A :class:`Param` (from :func:`load_param` or :func:`param_from_dict`) is returned as it is. Anything else,
    DECODE's ``RecursiveNamespace`` from ``decode.utils.param_io.load_params``, a ``SimpleNamespace`` or a dict of
    sections, is read into plain data, filled with decode-var's defaults (a missing ``VAR`` section included)
    and validated as :func:`param_from_dict` does. DECODE's reference leaves required values empty
    (``Camera.baseline:``), so an empty value is taken as unset and gets decode-var's default, except
    where empty is a choice (:data:`EMPTY_IS_A_CHOICE`).
    """
    if isinstance(param, Param):
        return param
    data = _plain(param)
    if not isinstance(data, dict):
        raise ParamError(f"parse(param) needs a param (from load_param, DECODE's load_params, or a dict of "
                         f"sections), got {type(param).__name__}.")
    _drop_unset(data, load_reference())
    _drop_decodes_arch_default(data)
    return param_from_dict(data, source=f"param ({type(param).__name__})")


def _plain(obj):
    """Nested dicts and lists from namespaces (DECODE's ``RecursiveNamespace`` is a ``SimpleNamespace``)."""
    if isinstance(obj, Param):
        return obj.to_dict()
    if isinstance(obj, SimpleNamespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _drop_unset(data: dict, reference: dict, path: str = "") -> None:
    """Remove empty values that have a default in ``reference`` (in place), so that :func:`autofill` sets it."""
    for key in list(data):
        where, ref = f"{path}.{key}" if path else str(key), reference.get(key)
        if isinstance(data[key], dict) and isinstance(ref, dict):
            _drop_unset(data[key], ref, where)
        elif data[key] is None and ref is not None and not isinstance(ref, dict) and where not in EMPTY_IS_A_CHOICE:
            del data[key]


def _drop_decodes_arch_default(data: dict) -> None:
    """DECODE's loader fills ``HyperParameter.arch_param.initial_features: 48`` (SigmaMUNet's width) into every
    param; where ``VAR.model.features`` is given that filled 48 must not override it (in place)."""
    hp, var = data.get("HyperParameter"), data.get("VAR")
    arch = hp.get("arch_param") if isinstance(hp, dict) else None
    var_model = var.get("model") if isinstance(var, dict) else None
    if (isinstance(arch, dict) and arch.get("initial_features") == DECODE_ARCH_FEATURES
            and isinstance(var_model, dict) and var_model.get("features") is not None):
        del arch["initial_features"]


def _deep_update(d: dict, u: dict) -> None:
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            _deep_update(d[k], v)
        else:
            d[k] = copy.deepcopy(v)


def autoset_scaling(param: Param) -> Param:
    """Derive empty ``Scaling`` values the way DECODE's ``autoset_scaling`` does."""
    sim, sc = param.Simulation, param.Scaling
    mu_sig = _pair(sim.intensity_mu_sig, "Simulation.intensity_mu_sig")
    bg = sim.bg_uniform
    bg_lo, bg_hi = _pair(bg, "Simulation.bg_uniform") if isinstance(bg, (list, tuple)) else (bg, bg)
    if not _is_number(bg_lo) or not _is_number(bg_hi):
        raise ParamError(f"Simulation.bg_uniform must be a number or [low, high] (photons / px), got {bg!r}.")
    ext = sim.emitter_extent
    _extent(ext, "Simulation.emitter_extent", n_axes=3)
    _require(mu_sig[0] > 0 and mu_sig[1] >= 0, f"Simulation.intensity_mu_sig must be [mean > 0, sd >= 0] photons, "
             f"got {list(mu_sig)}. Negative photons are not physical.")
    if sc.input_scale is None:
        sc.input_scale = mu_sig[0] / 50
    if sc.phot_max is None:
        sc.phot_max = mu_sig[0] + 8 * mu_sig[1]
    if sc.z_max is None:
        sc.z_max = ext[2][1] * 1.2
    if sc.input_offset is None:
        sc.input_offset = (bg_lo + bg_hi) / 2
    if sc.bg_max is None:  # DECODE: 1.2 * upper bg; a smooth field adds its peak (and the drift's)
        sc.bg_max = (bg_hi + _perlin_peak(param)) * 1.2
    return param


def _perlin_peak(param: Param) -> float:
    """Highest photons / px the Perlin field can add (0 when off or malformed; validate() reports that)."""
    amp = param.Simulation.get("bg_perlin_amplitude")
    amps = amp if isinstance(amp, (list, tuple)) else [amp]
    drift = param.VAR.get("bg_drift") if "VAR" in param else None
    drift = drift if _is_finite(drift) and drift > 0 else 0.0
    half = (param.HyperParameter.channels_in - 1) // 2 if _is_number(param.HyperParameter.channels_in) else 0
    return sum(a for a in amps if _is_finite(a) and a > 0) * (1 + drift * half)


def _pair(value, key) -> tuple:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ParamError(f"{key} must be two numbers [a, b], got {value!r}.")
    return float(value[0]), float(value[1])


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ParamError(msg)


def _is_finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def _check_int(key: str, v, lo: int, hi: float = math.inf, what: str = "") -> None:
    """``key`` must be a whole number in [lo, hi] (1.0 counts as 1; NaN, inf, true, "1" do not)."""
    ok = _is_finite(v) and int(v) == v and lo <= v <= hi
    rng = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
    _require(ok, f"{key} must be an integer {rng}{what}, got {v!r}.")


def _check_num(key: str, v, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
               what: str = "", hi_open: bool = False) -> None:
    """``key`` must be a finite number in [lo, hi] (open ends with ``lo_open`` / ``hi_open``)."""
    ok = _is_finite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if lo == -math.inf and hi == math.inf:
        rng = "a finite number"
    elif hi == math.inf:
        rng = f"a number {'>' if lo_open else '>='} {lo}"
    else:
        rng = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    _require(ok, f"{key} must be {rng}{what}, got {v!r}.")


def _check_choice(key: str, v, choices) -> None:
    names = " or ".join([", ".join(choices[:-1]), choices[-1]]) if len(choices) > 1 else choices[0]
    _require(isinstance(v, str) and v in choices, f"{key} must be {names}, got {v!r}."
             + (_suggest(v, choices) if isinstance(v, str) else ""))


def _extent(value, key, n_axes=2) -> None:
    _require(isinstance(value, (list, tuple)) and len(value) >= n_axes,
             f"{key} must list [[x0, x1], [y0, y1], ...], got {value!r}.")
    for axis, name in zip(value[:n_axes], "xyz"):
        lo, hi = _pair(axis, f"{key} ({name})")
        _require(hi > lo, f"{key} ({name}) must have upper > lower, got {axis!r}.")


def _check_perlin(sim: Param) -> None:
    """``Simulation.bg_perlin_*`` (DECODE 0.9's keys): amplitudes >= 0 photons / px, one integer scale each."""
    amp, scale = sim.bg_perlin_amplitude, sim.bg_perlin_scale
    if amp is None:
        return
    amps = amp if isinstance(amp, (list, tuple)) else [amp]
    _require(len(amps) > 0 and all(_is_finite(a) and a >= 0 for a in amps),
             f"Simulation.bg_perlin_amplitude must be >= 0 photons / px (one value, or one per scale), got {amp!r}.")
    scales = scale if isinstance(scale, (list, tuple)) else [scale] * len(amps)
    _require(len(scales) == len(amps) and all(_is_finite(v) and int(v) == v and v >= 1 for v in scales),
             f"Simulation.bg_perlin_scale must be an integer >= 1 (lattice cells across the frame), one per "
             f"bg_perlin_amplitude, got {scale!r} for amplitudes {amp!r}.")
    _require(isinstance(sim.bg_perlin_draw_amps, bool), f"Simulation.bg_perlin_draw_amps must be true or false, "
             f"got {sim.bg_perlin_draw_amps!r}.")


def validate(param: Param) -> None:
    """Check every value the plugin reads; raise one :class:`ParamError` naming key and fix.

    Types, finiteness and ranges are checked here, once, before anything is built: a wrong value never
    surfaces later as a bare TypeError deep inside a component. Defaults are filled before, from
    ``reference.yaml`` (:func:`autofill`); the two together are the one place of the configuration.
    """
    _check_simulation(param.Simulation)
    _check_camera(param.Camera)
    _check_camera_maps_backend(param)
    _check_hyperparameter(param.HyperParameter)
    _check_hardware_and_files(param)
    _check_output_and_evaluation(param)
    _check_scaling(param.Scaling)
    _check_var(param)
    _check_var_model(param.VAR.model)
    _check_var_loss(param.VAR.loss)
    _check_uncertainty(param)
    _check_var_train(param)


def _check_simulation(sim: Param) -> None:
    img = sim.img_size
    _require(isinstance(img, (list, tuple)) and len(img) == 2 and all(_is_finite(v) and int(v) == v and v >= 4
                                                                      for v in img),
             f"Simulation.img_size must be two integers >= 4 (px), got {img!r}.")
    _extent(sim.psf_extent, "Simulation.psf_extent")
    mu, sig = _pair(sim.intensity_mu_sig, "Simulation.intensity_mu_sig")
    _require(mu > 0 and sig >= 0, f"Simulation.intensity_mu_sig must be [mean > 0, sd >= 0] photons, got {[mu, sig]}. "
             "Negative photons are not physical.")
    bg = sim.bg_uniform if isinstance(sim.bg_uniform, (list, tuple)) else [sim.bg_uniform, sim.bg_uniform]
    _require(all(_is_finite(b) and b >= 0 for b in bg) and bg[1] >= bg[0],
             f"Simulation.bg_uniform must be >= 0 photons / px with low <= high, got {sim.bg_uniform!r}.")
    av = sim.emitter_av
    if isinstance(av, (list, tuple)):
        lo, hi = _pair(av, "Simulation.emitter_av")
        _require(math.isfinite(hi) and 0 <= lo <= hi, f"Simulation.emitter_av as a range must be [low, high] "
                 f"emitters per frame with 0 <= low <= high, got {av!r}.")
    else:
        _check_num("Simulation.emitter_av", av, 0, what=" (emitters per frame, or a range [low, high])")
    _check_perlin(sim)
    _check_num("Simulation.lifetime_avg", sim.lifetime_avg, 0, lo_open=True, what=" (frames)")
    _require(sim.intensity_th is None or _is_finite(sim.intensity_th),
             f"Simulation.intensity_th must be a number (photons) or empty, got {sim.intensity_th!r}.")


def _check_camera(cam: Param) -> None:
    for key in ("qe", "e_per_adu", "read_sigma", "spur_noise", "baseline"):
        _check_num(f"Camera.{key}", getattr(cam, key), 0)
    _require(0 < cam.qe <= 1, f"Camera.qe must be in (0, 1], got {cam.qe!r}.")
    _require(cam.e_per_adu > 0, f"Camera.e_per_adu must be > 0, got {cam.e_per_adu!r}.")
    _require(cam.em_gain is None or (_is_finite(cam.em_gain) and cam.em_gain > 0),
             f"Camera.em_gain must be > 0, or empty for an sCMOS camera, got {cam.em_gain!r}.")
    _require(isinstance(cam.convert2photons, bool), f"Camera.convert2photons must be true or false, "
             f"got {cam.convert2photons!r}.")
    px = cam.px_size
    _require(isinstance(px, (list, tuple)) and len(px) == 2 and all(_is_finite(v) and v > 0 for v in px),
             f"Camera.px_size must be two numbers > 0 (nm per px), got {px!r}.")
    _check_camera_maps(cam)


def _check_camera_maps_backend(param: Param) -> None:
    maps = [k for k in ("offset_map", "gain_map", "read_var_map") if param.Camera.get(k) is not None]
    _require(not maps or param.VAR.backend != "decode",
             f"Camera.{maps[0] if maps else ''} is set, but VAR.backend: decode simulates with DECODE's camera, which "
             "has no per-pixel maps. Set VAR.backend: builtin to train with the maps, or leave the map keys empty.")


def _check_camera_maps(cam: Param) -> None:
    """The keys of the per-pixel sCMOS maps; the files themselves are read and checked by
    ``decode_var.data.camera_maps`` when the camera is built."""
    for key in ("offset_map", "gain_map", "read_var_map"):
        v = cam.get(key)
        _require(v is None or (isinstance(v, str) and v.strip().lower().endswith((".npy", ".tif", ".tiff"))),
                 f"Camera.{key} must be the path of a .npy or .tif map of the whole chip, or empty, got {v!r}.")
    o = cam.get("roi_origin")
    _require(o is None or (isinstance(o, (list, tuple)) and len(o) == 2
                           and all(_is_finite(v) and int(v) == v and v >= 0 for v in o)),
             f"Camera.roi_origin must be two integers >= 0 (px on the chip of the frame's first row and column), "
             f"got {o!r}.")


def _check_hyperparameter(hp: Param) -> None:
    for key in ("architecture", "loss_impl"):
        v = getattr(hp, key)
        _require(isinstance(v, str) and v.strip() != "", f"HyperParameter.{key} must be a name "
                 f"(see decode_var.registry: list_models(), list_losses()), got {v!r}.")
    _require(_is_number(hp.channels_in) and hp.channels_in in (1, 3),
             f"HyperParameter.channels_in must be 1 or 3 (frame window), got {hp.channels_in!r}.")
    ch_out = hp.get("channels_out")
    if hp.architecture == "VARMultiScale":
        _require(ch_out in (None, 6, 10), f"HyperParameter.channels_out must be 6 ([p, phot, x, y, z, bg]), 10 (with "
                 f"VAR.model.uncertainty) or empty for VARMultiScale, got {ch_out!r}.")
    for key in ("batch_size", "pseudo_ds_size"):
        _check_int(f"HyperParameter.{key}", getattr(hp, key), 1)
    _check_int("HyperParameter.epochs", hp.epochs, 0)
    roi = hp.target_roi_size
    _require(_is_finite(roi) and int(roi) == roi and roi >= 1 and roi % 2 == 1,
             f"HyperParameter.target_roi_size must be an odd integer >= 1 (cells), got {roi!r}.")
    _require(hp.emitter_label_photon_min is None or (_is_finite(hp.emitter_label_photon_min)
                                                     and hp.emitter_label_photon_min >= 0),
             f"HyperParameter.emitter_label_photon_min must be a number >= 0 (photons) or empty, "
             f"got {hp.emitter_label_photon_min!r}.")
    _check_int("HyperParameter.max_number_targets", hp.max_number_targets, 1)
    _require(hp.optimizer in ("Adam", "AdamW"), f"HyperParameter.optimizer must be Adam or AdamW, got {hp.optimizer!r}.")
    _require(isinstance(hp.opt_param, Param) and _is_finite(hp.opt_param.get("lr")) and hp.opt_param.lr > 0,
             f"HyperParameter.opt_param.lr must be a number > 0, got {hp.opt_param!r}.")
    for key in hp.opt_param.keys():
        v = hp.opt_param.get(key)
        _require(isinstance(v, (bool, str)) or _is_finite(v) or (isinstance(v, (list, tuple)) and all(
                 _is_finite(x) for x in v)), f"HyperParameter.opt_param.{key} must be a finite number (or a list of "
                 f"them, e.g. betas), got {v!r}.")
    scheds = ("cosine", "StepLR", "ReduceLROnPlateau")
    _require(hp.learning_rate_scheduler in scheds,
             f"HyperParameter.learning_rate_scheduler must be one of {scheds}, got {hp.learning_rate_scheduler!r}."
             + (_suggest(hp.learning_rate_scheduler, scheds) if isinstance(hp.learning_rate_scheduler, str) else ""))


def _check_hardware_and_files(param: Param) -> None:
    hw = param.Hardware
    _require(isinstance(hw.device, str) and hw.device.strip() != "",
             f"Hardware.device must be a device name (cpu, cuda, cuda:0, ...), got {hw.device!r}.")
    _require(isinstance(hw.device_simulation, str) and hw.device_simulation.strip() != "",
             f"Hardware.device_simulation must be a device name (cpu, cuda, ...), got {hw.device_simulation!r}.")
    _check_int("Hardware.torch_threads", hw.torch_threads, 1, 4096)
    _check_int("Hardware.num_worker_train", hw.num_worker_train, 0, 4096)
    _check_int("TestSet.test_size", param.TestSet.test_size, 1)
    for key in ("calibration_file", "checkpoint_init", "experiment_out", "model_init"):
        v = param.InOut.get(key)
        _require(v is None or isinstance(v, str), f"InOut.{key} must be a path or empty, got {v!r}.")
    _require(isinstance(param.InOut.experiment_out, str) and param.InOut.experiment_out.strip() != "",
             f"InOut.experiment_out must be a folder, got {param.InOut.experiment_out!r}.")


def _check_output_and_evaluation(param: Param) -> None:
    _require(_is_finite(param.PostProcessingParam.raw_th) and 0 < param.PostProcessingParam.raw_th < 1,
             f"PostProcessingParam.raw_th must be in (0, 1), got {param.PostProcessingParam.raw_th!r}.")
    _require(param.PostProcessing in (None, "SpatialIntegration", "LookUp"),
             f"PostProcessing must be SpatialIntegration, LookUp or empty, got {param.PostProcessing!r}.")
    ev = param.Evaluation
    _require(_is_number(ev.match_dims) and ev.match_dims in (2, 3),
             f"Evaluation.match_dims must be 2 or 3, got {ev.match_dims!r}.")
    for key in ("dist_lat", "dist_ax"):
        v = getattr(ev, key)
        _require(_is_number(v) and v > 0, f"Evaluation.{key} must be > 0 nm, got {v!r}.")
    _require(ev.dist_vol is None or (_is_number(ev.dist_vol) and ev.dist_vol > 0),
             f"Evaluation.dist_vol must be > 0 nm or empty, got {ev.dist_vol!r}.")


def _check_scaling(scaling: Param) -> None:
    for key in ("input_scale", "phot_max", "z_max", "bg_max"):
        v = getattr(scaling, key)
        _require(_is_number(v) and v > 0 and math.isfinite(v),
                 f"Scaling.{key} must be > 0 (derived from Simulation when empty), got {v!r}. "
                 f"Set it, or fix the Simulation values it is derived from.")
    _require(_is_finite(scaling.input_offset),
             f"Scaling.input_offset must be a number (photons / px; derived from Simulation.bg_uniform when "
             f"empty), got {scaling.input_offset!r}.")


def _check_var(param: Param) -> None:
    sim, var = param.Simulation, param.VAR
    _check_num("VAR.bg_drift", var.bg_drift, 0, 1, what=" (relative change of the smooth background per frame)")
    _check_choice("VAR.backend", var.backend, ("auto", "decode", "builtin"))
    _check_choice("VAR.psf", var.psf, ("gaussian", "spline"))
    _check_num("VAR.merge_px", var.merge_px, 0, 2, what=" (input px; 0 = no repeated emitter dropped)")
    _require(isinstance(var.scales, (list, tuple)), f"VAR.scales must be a list of factors, got {var.scales!r}.")
    ScaleSchedule(sim.img_size, var.scales, xextent=sim.psf_extent[0], yextent=sim.psf_extent[1])
    g = var.gaussian_psf
    for key in ("sigma_0", "rl_range"):
        _check_num(f"VAR.gaussian_psf.{key}", getattr(g, key), 0, lo_open=True)
    _check_num("VAR.gaussian_psf.foc_shift", g.foc_shift, what=" (nm)")
    _require(isinstance(g.mode_3d, bool), f"VAR.gaussian_psf.mode_3d must be true or false, got {g.mode_3d!r}.")
    for key in ("seed", "test_seed"):  # torch seeds must fit in 64 bits
        v = getattr(var, key)
        _require(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63,
                 f"VAR.{key} must be an integer in [0, 2^63), got {v!r}.")
    tf = var.teacher_forcing
    for key in ("start", "end"):
        _check_num(f"VAR.teacher_forcing.{key}", getattr(tf, key), 0, 1, what=" (a probability)")
    _check_int("VAR.teacher_forcing.epochs", tf.epochs, 0)


def _check_var_model(vm: Param) -> None:
    """``VAR.model``: the network's shape (the model reads these values as they are)."""
    for key in ("features", "token_dim", "depth", "heads", "window"):
        _check_int(f"VAR.model.{key}", vm.get(key), 1)
    _require(vm.token_dim % vm.heads == 0, f"VAR.model.token_dim = {vm.token_dim} is not divisible by "
             f"VAR.model.heads = {vm.heads}; pick e.g. token_dim {vm.heads * max(1, round(vm.token_dim / vm.heads))}.")
    _check_num("VAR.model.mlp_ratio", vm.mlp_ratio, 0, lo_open=True)
    _check_num("VAR.model.token_max_factor", vm.token_max_factor, 0)
    _check_choice("VAR.model.conditioning", vm.conditioning, ("next_scale", "independent", "single"))
    _require(isinstance(vm.detach_condition, bool),
             f"VAR.model.detach_condition must be true or false, got {vm.detach_condition!r}.")
    _require(isinstance(vm.uncertainty, bool),
             f"VAR.model.uncertainty must be true or false, got {vm.uncertainty!r}.")
    if vm.p_init is not None:
        _check_num("VAR.model.p_init", vm.p_init, 0, 1, lo_open=True, hi_open=True,
                   what=" (initial p per finest cell; empty = from Simulation.emitter_av)")


def _check_uncertainty(param: Param) -> None:
    """``VAR.model.uncertainty`` needs the model that predicts sigma and a loss that trains it."""
    hp = param.HyperParameter
    if not param.VAR.model.uncertainty:
        return
    _require(hp.architecture == "VARMultiScale" and hp.loss_impl in ("AdaptivePPXYZB", "PPXYZB"),
             f"VAR.model.uncertainty: true needs HyperParameter.architecture VARMultiScale and loss_impl "
             f"AdaptivePPXYZB or PPXYZB (they predict and train the sigmas), got {hp.architecture!r} with "
             f"{hp.loss_impl!r}. Set VAR.model.uncertainty: false (SigmaMUNet predicts its own sigmas).")


def _check_var_loss(loss: Param) -> None:
    """The kinds of ``VAR.loss`` keys whose default is empty (the loss checks the values, naming the key)."""
    _require(loss.adaptive is None or isinstance(loss.adaptive, bool),
             f"VAR.loss.adaptive must be true, false or empty, got {loss.adaptive!r}.")
    cw = loss.channel_weights
    _require(cw is None or isinstance(cw, (str, list, tuple)), f"VAR.loss.channel_weights must be a preset name "
             f"or a list of 6 numbers [p, phot, x, y, z, bg] (or empty), got {cw!r}.")


def _check_var_train(param: Param) -> None:
    var, hp = param.VAR, param.HyperParameter
    tr = var.train
    _check_num("VAR.train.grad_clip", tr.grad_clip, 0, what=" (0 = off)")
    grad_mod = getattr(hp, "grad_mod", None)
    _require(grad_mod is None or isinstance(grad_mod, bool),
             f"HyperParameter.grad_mod must be true (DECODE's gradient clipping at norm 0.03), false or empty "
             f"(VAR.train.grad_clip applies), got {grad_mod!r}.")
    _require(not getattr(hp, "moeller_gradient_rescale", None),
             "HyperParameter.moeller_gradient_rescale: true is not supported by decode-var's engine. Set it to "
             "false (DECODE's default); VAR.train.grad_clip or HyperParameter.grad_mod bound the gradients.")
    _check_int("VAR.train.max_nonfinite_in_row", tr.max_nonfinite_in_row, 1)
    _check_int("VAR.train.warmup_epochs", tr.warmup_epochs, 0)
    _check_int("VAR.train.eval_every", tr.eval_every, 1)
    _check_num("VAR.train.ema", tr.ema, 0, 1, hi_open=True, what=" (the decay per step of the weights' moving "
               "average, e.g. 0.995; 0 = none)")
    _require(isinstance(tr.plot, bool), f"VAR.train.plot must be true or false, got {tr.plot!r}.")
    _require(tr.prefetch in ("auto", True, False), f"VAR.train.prefetch must be auto, true or false, "
             f"got {tr.prefetch!r}.")
    if var.psf == "spline" and not param.InOut.calibration_file:
        raise ParamError("VAR.psf is spline but InOut.calibration_file is empty. Set it to your SMAP spline "
                         "calibration (.mat), or use VAR.psf: gaussian, which needs no calibration.")


def save_param(path: Union[str, Path], param: Union[Param, dict]) -> None:
    """Write a param file atomically (a crash leaves the old file or the new one, never half)."""
    data = param.to_dict() if isinstance(param, Param) else param
    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))
