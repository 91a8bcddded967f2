"""The bundle: a directory holding everything needed to rebuild, run, steer and export a GatedViT.

    BUNDLE/headsteer.json       format version, timm model, gates, SAE sites, normalization,
                                class names, steering-table index, file checksums
    BUNDLE/model.safetensors    GatedViT weights (timm backbone + gates + SAEs)
    BUNDLE/steering.safetensors per-class `steer_scale` / `steer_shift` rows (optional)

Only safetensors and JSON are read back: loading never unpickles. A bundle is written into a
temporary sibling directory and renamed into place, so a crash never leaves half a bundle.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from headsteer.runtime.errors import BundleError, InputError, UnsupportedModelError
from headsteer.runtime.files import give_usual_file_mode, staged_directory
from headsteer.runtime.gated_vit import GatedViT

FORMAT_NAME = "headsteer-bundle"
FORMAT_VERSION = 1
CONFIG_FILE = "headsteer.json"
WEIGHTS_FILE = "model.safetensors"
STEERING_FILE = "steering.safetensors"
BUNDLE_FILES = (WEIGHTS_FILE, STEERING_FILE)  # every file a bundle may hold besides its header
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a bundle's model section may pass to GatedViT.from_timm: its options, never
# pretrained_file (that would read an arbitrary, possibly pickled, checkpoint).
MODEL_OPTIONS = tuple(
    name for name in inspect.signature(GatedViT.from_timm).parameters
    if name not in ("cls", "model_or_name", "timm_kwargs", "pretrained_file")
)
# timm_kwargs that would download or unpickle weights while rebuilding the model.
FETCHING_TIMM_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg_overlay")


def repeated_names(names: Sequence[str]) -> list[str]:
    """The names that occur more than once (a steering table's rows are picked by name)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def names_outside(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """The names (steering rows) that are not among `known` (the bundle's classes)."""
    known = set(known)
    return [name for name in names if name not in known]


def refuse_single_string(names, what: str) -> None:
    """InputError for a bare str or bytes where a list of names belongs (Python would iterate it
    as one name per character)."""
    if isinstance(names, (str, bytes)):
        raise InputError(f"{what} must be a list of strings, got the single {type(names).__name__} {names[:40]!r}")


def class_name_list(class_names: Optional[Sequence[str]], num_classes: int) -> list[str]:
    """`class_names` as a list of `num_classes` unique strings ("0", "1", ... when None); InputError
    otherwise. A bare string is refused rather than read as one name per character."""
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    refuse_single_string(class_names, "class names")
    class_names = list(class_names)
    if len(class_names) != num_classes:
        raise InputError(f"{len(class_names)} class names for a model with {num_classes} classes")
    # (load refuses both: predictions and steering targets are class names, one per class)
    odd = [name for name in class_names if not isinstance(name, str)]
    if odd:
        raise InputError(f"class names must be strings, got {type(odd[0]).__name__} {odd[0]!r} "
                         "(e.g. class_names=[str(i) for i in range(num_classes)])")
    repeated = repeated_names(class_names)
    if repeated:
        raise InputError(f"class names must be unique (a name picks one class), repeated: {repeated}")
    return class_names


def _plain_target(target):
    """A steer target with numpy/torch integers and 0-d tensors or arrays as Python ints; a bool
    (a 0-d bool one too, which operator.index would read as 1), a float or anything else is
    returned as it is, for the caller to refuse."""
    if getattr(target, "ndim", None) == 0 and hasattr(target, "item"):
        target = target.item()
    if not isinstance(target, (str, bool)) and hasattr(target, "__index__"):
        target = operator.index(target)
    return target


@dataclass
class SteeringTable:
    """Per-class steering rows: row c of `scale`/`shift` [C, S_total] steers toward class c.

    `info` holds per-class provenance (chosen latents, alpha) as JSON-able dicts."""

    class_names: list[str]
    scale: torch.Tensor
    shift: torch.Tensor
    info: list = field(default_factory=list)

    def __post_init__(self):
        refuse_single_string(self.class_names, "steering table class names")
        rows = len(self.class_names)
        if self.scale.dim() != 2 or self.scale.shape != self.shift.shape or self.scale.shape[0] != rows:
            raise InputError(
                f"steering table needs scale and shift of shape [{rows}, S_total], "
                f"got {tuple(self.scale.shape)} and {tuple(self.shift.shape)}"
            )
        repeated = repeated_names(self.class_names)
        if repeated:
            raise InputError(f"steering table class names must be unique (a name picks one row), repeated: {repeated}")

    @property
    def width(self) -> int:
        return self.scale.shape[1]

    def index_of(self, steer: Union[str, int]) -> int:
        """Row index for a class name or index; InputError if unknown."""
        steer = _plain_target(steer)
        if isinstance(steer, bool) or not isinstance(steer, (str, int)):
            raise InputError(f"a steering target is a class name or index, got {steer!r}")
        if isinstance(steer, int):
            if not 0 <= steer < len(self.class_names):
                raise InputError(f"steering class index {steer} out of range [0, {len(self.class_names)})")
            return steer
        try:
            return self.class_names.index(steer)
        except ValueError:
            shown = ", ".join(self.class_names[:12]) + (", ..." if len(self.class_names) > 12 else "")
            raise InputError(f"unknown steering class {steer!r}; the steering table has: {shown}") from None

    def rows(self, targets: Sequence[Optional[Union[str, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S] scale and shift for per-sample targets (None = identity steering)."""
        scale = torch.ones(len(targets), self.width, dtype=self.scale.dtype)
        shift = torch.zeros(len(targets), self.width, dtype=self.shift.dtype)
        for sample, target in enumerate(targets):
            if target is not None:
                row = self.index_of(target)
                scale[sample], shift[sample] = self.scale[row], self.shift[row]
        return scale, shift


@dataclass
class BundleInfo:
    """What a bundle records beyond weights (the parsed headsteer.json plus its steering table)."""

    path: Path
    config: dict
    class_names: list[str]
    mean: tuple
    std: tuple
    steering: Optional[SteeringTable]
    extra: dict

    def steering_row(self, target: Union[str, int, None]) -> Optional[str]:
        """The steering-table row name for a steer target: a class name, or an index of the
        bundle's classes (as in `steer=labels`; the table's rows may be in another order or cover
        only some classes); None stays None. InputError for an unknown class, an index out of
        range, a class the table has no row for, or a bundle without a table."""
        if target is None:
            return None
        target = _plain_target(target)
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 <= target < len(self.class_names):
                raise InputError(f"steering class index {target} out of range [0, {len(self.class_names)})")
            target = self.class_names[target]
        if self.steering is None:
            raise InputError("this bundle has no steering table; steer must be None")
        if isinstance(target, str) and target in self.class_names and target not in self.steering.class_names:
            shown = ", ".join(self.steering.class_names[:12]) + (", ..." if len(self.steering.class_names) > 12 else "")
            raise InputError(f"class {target!r} has no row in the steering table (rows: {shown})")
        return self.steering.class_names[self.steering.index_of(target)]


def _sae_sites(model: GatedViT) -> list[dict]:
    """The header's `sae_sites`: where each SAE reads and which latent columns of steering it owns."""
    return [
        dict(block=block, width=width, offset=offset, activation=model.sae_activation, k=model.sae_k)
        for block, width, offset in zip(model.sae_blocks, model.sae_widths, model.sae_offsets)
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_replaceable(path: Path, overwrite: bool, what: str = "") -> None:
    """Refuse, before anything is written, what saving a bundle at `path` must not replace. Saving
    swaps the whole folder out and deletes it, so only a bundle holding nothing but bundle files or
    an empty folder is replaced (and only with `overwrite`); a file, a dangling link or a folder
    holding anything else would be lost, and is refused. `what` names the path in messages (e.g.
    "--out")."""
    named = f"{what} {path}" if what else str(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise InputError(f"{named} exists and is not a folder; give a new path, an empty folder or a bundle to replace")
    if not overwrite:
        raise BundleError(f"{named} already exists; pass overwrite=True to replace it")
    try:
        entries = sorted(entry.name for entry in path.iterdir())
    except OSError as error:
        raise InputError(f"{named} cannot be read: {error.strerror or error}") from None
    if entries and CONFIG_FILE not in entries:
        raise InputError(f"{named} is a folder that is not a headsteer bundle (no {CONFIG_FILE}) and not empty; "
                         "overwriting would delete it: give a new path, an empty folder or a bundle to replace")
    foreign = [name for name in entries if name not in (CONFIG_FILE, *BUNDLE_FILES)]
    if foreign:
        raise InputError(f"{named} holds files beside its bundle ({foreign[:8]}), which overwriting would delete; "
                         "move them, or give another path")


def save_bundle(
    model: GatedViT,
    path: Union[str, Path],
    *,
    class_names: Optional[Sequence[str]] = None,
    steering: Optional[SteeringTable] = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (and its steering table) as a bundle directory at `path`; returns the path.

    The bundle appears at `path` complete or not at all; with `overwrite`, only a bundle or an
    empty folder there is replaced. `extra` is JSON-able metadata (e.g. a training report) stored
    verbatim."""
    path = Path(path)
    if model.timm_name is None:
        raise BundleError(
            "this GatedViT was built from a model instance; build it with GatedViT.from_timm(name, timm_kwargs=...) "
            "so the bundle can rebuild the timm model on load"
        )
    num_classes = model.vit.num_classes
    if num_classes == 0:
        raise InputError(
            "the model has no classifier head (timm num_classes=0: its 'logits' are pooled features); "
            "a bundle classifies, so build it with num_classes set"
        )
    class_names = class_name_list(class_names, num_classes)
    if steering is not None and steering.width != model.steer_width:
        raise InputError(f"steering table is {steering.width} wide; the model's steer_width is {model.steer_width}")
    if steering is not None:
        foreign = names_outside(steering.class_names, class_names)
        if foreign:
            raise InputError(
                f"the steering table has rows for classes the model does not have: {foreign[:8]}; "
                "its class names must be among the bundle's class_names"
            )
        # (checked as saved, float32: a float64 value past its range would be stored as inf)
        for name, tensor in (("steer_scale", steering.scale.float()), ("steer_shift", steering.shift.float())):
            if _count_non_finite(tensor):
                raise InputError(f"steering table {name} holds {_count_non_finite(tensor)} non-finite value(s) "
                                 "(NaN or infinity), which would steer its classes' outputs to NaN")
    # (load refuses a header whose extra is not an object, whose steering info covers only some
    # rows, or whose timm_kwargs fetch weights; metadata json cannot write failed only after the
    # weights were written)
    if extra is not None and not isinstance(extra, dict):
        raise InputError(f"extra must be a dict of JSON metadata, got {type(extra).__name__}")
    _check_json_storable("extra", extra)
    if steering is not None:
        if len(steering.info) not in (0, len(steering.class_names)):
            raise InputError(f"steering table info has {len(steering.info)} entries for {len(steering.class_names)} rows; "
                             "give one per row or none")
        _check_json_storable("steering table info", list(steering.info))
    _check_json_storable("the model's configuration (timm_kwargs and GatedViT options)", model.config())
    fetching = [key for key in FETCHING_TIMM_KWARGS if (model.timm_kwargs or {}).get(key)]
    if fetching:
        raise InputError(
            f"the model's timm_kwargs hold {fetching}, which a bundle cannot record (loading one never downloads or "
            "unpickles weights); build it with GatedViT.from_timm(name, timm_kwargs=..., pretrained_file=PATH) to start "
            "from a local weights file (the bundle stores the weights itself)"
        )
    rounded = {name: tensor.dtype for name, tensor in model.state_dict().items()
               if tensor.is_floating_point() and not _loads_exactly(tensor.dtype, torch.float32)}
    if rounded:
        name, dtype = next(iter(rounded.items()))
        raise InputError(f"{len(rounded)} weights (e.g. {name}) are {dtype}; a bundle loads into a float32 model, "
                         "which would round them: cast the model with .float() first")
    for name, tensor in model.state_dict().items():
        if _count_non_finite(tensor):
            raise InputError(f"weight {name} holds {_count_non_finite(tensor)} non-finite value(s) (NaN or infinity), "
                             "which would poison the model's outputs; a bundle of it would be refused on load")
    check_replaceable(path, overwrite)
    in_chans = model.vit.patch_embed.proj.in_channels
    mean, std = (_normalization_argument(name, values, in_chans) for name, values in (("mean", mean), ("std", std)))

    with staged_directory(path) as staging:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, staging / WEIGHTS_FILE)
        give_usual_file_mode(staging / WEIGHTS_FILE)
        files = {WEIGHTS_FILE: _sha256(staging / WEIGHTS_FILE)}
        steering_index = None
        if steering is not None:
            save_file(
                {"steer_scale": steering.scale.float().contiguous(), "steer_shift": steering.shift.float().contiguous()},
                staging / STEERING_FILE,
            )
            give_usual_file_mode(staging / STEERING_FILE)
            files[STEERING_FILE] = _sha256(staging / STEERING_FILE)
            steering_index = dict(file=STEERING_FILE, classes=list(steering.class_names), info=list(steering.info))
        config = dict(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            model=model.config(),
            image_size=list(model.image_size),
            in_chans=model.vit.patch_embed.proj.in_channels,
            normalization=dict(mean=mean, std=std),
            class_names=class_names,
            num_heads=model.num_heads,
            gated_blocks=model.gate_blocks,
            sae_sites=_sae_sites(model),
            steer_width=model.steer_width,
            steering=steering_index,
            files=files,
            extra=extra or {},
        )
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def _check_json_storable(what: str, value) -> None:
    """InputError unless `value` can be written into headsteer.json (e.g. a numpy number cannot)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what} cannot be stored as JSON ({error}); use plain Python numbers, strings, lists and dicts") from None


def _normalization_problem(name: str, values: list, in_chans: int) -> Optional[str]:
    """Why `values` cannot be the normalization `name` of a model with `in_chans` channels (or None):
    images are normalized as (x - mean) / std per channel, so a short list fails at predict time
    and a zero or non-finite std gives NaN logits."""
    if len(values) != in_chans:
        return f"normalization {name} needs one value per input channel ({in_chans}), got {values}"
    if not all(math.isfinite(v) for v in values):
        return f"normalization {name} must be finite, got {values}"
    if name == "std" and not all(v > 0 for v in values):
        return f"normalization std must be positive (images are divided by it), got {values}"
    return None


def _normalization_argument(name: str, values, in_chans: int) -> list[float]:
    """save_bundle's `mean`/`std` as a list of floats; InputError if it is not usable."""
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"normalization {name} must be a sequence of numbers, got {values!r}") from None
    problem = _normalization_problem(name, floats, in_chans)
    if problem:
        raise InputError(problem)
    return floats


_MISSING = object()


def _shown(value) -> str:
    """A header value for an error message: short, and 'nothing' for a missing key."""
    if value is _MISSING:
        return "nothing (the key is missing)"
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list_of(value, check) -> bool:
    return isinstance(value, list) and all(check(item) for item in value)


def _expect(config_path: Path, field: str, value, ok: bool, expected: str) -> None:
    """BundleError naming the header file and `field` unless `ok`."""
    if not ok:
        raise BundleError(f"{config_path}: {field} must be {expected}, got {_shown(value)}; the bundle is corrupt")


def _check_model_section(config: dict, config_path: Path) -> None:
    """`model` is an object with a timm name, timm kwargs that fetch nothing, and known options."""
    model = config["model"]
    _expect(config_path, "model", model, isinstance(model, dict), "an object (timm_name, timm_kwargs, gate/SAE options)")
    name = model.get("timm_name", _MISSING)
    _expect(config_path, "model.timm_name", name, isinstance(name, str) and bool(name), "a timm model name")
    kwargs = model.get("timm_kwargs", _MISSING)
    _expect(config_path, "model.timm_kwargs", kwargs, isinstance(kwargs, dict), "an object of timm.create_model arguments")
    fetching = [key for key in FETCHING_TIMM_KWARGS if kwargs.get(key)]
    _expect(config_path, "model.timm_kwargs", kwargs, not fetching,
            f"free of {fetching} (loading a bundle never downloads or unpickles weights)")
    unknown = sorted(set(model) - {"timm_name", "timm_kwargs", *MODEL_OPTIONS})
    _expect(config_path, "model", model, not unknown, f"free of unknown keys {unknown} (known: {list(MODEL_OPTIONS)})")


def _check_normalization_section(config: dict, config_path: Path) -> None:
    """`normalization` holds one finite mean and one positive std per input channel."""
    norm = config["normalization"]
    _expect(config_path, "normalization", norm, isinstance(norm, dict), "an object with mean and std")
    for name in ("mean", "std"):
        values = norm.get(name, _MISSING)
        _expect(config_path, f"normalization.{name}", values, _is_list_of(values, _is_number), "a list of numbers")
        problem = _normalization_problem(name, values, config["in_chans"])
        if problem:
            raise BundleError(f"{config_path}: {problem}; the bundle is corrupt")


def _check_files_section(config: dict, config_path: Path) -> None:
    """`files` maps the bundle's own file names (the weights, and the steering table if any) to
    sha256 digests: nothing outside the bundle directory is ever read or hashed."""
    files = config["files"]
    _expect(config_path, "files", files, isinstance(files, dict), "an object mapping file names to sha256 digests")
    unknown = sorted(set(files) - set(BUNDLE_FILES))
    _expect(config_path, "files", files, not unknown, f"free of names other than {list(BUNDLE_FILES)}, found {unknown}")
    _expect(config_path, "files", files, WEIGHTS_FILE in files, f"an object listing {WEIGHTS_FILE}")
    for name, digest in files.items():
        _expect(config_path, f"files.{name}", digest,
                isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                "a sha256 digest (64 lowercase hex digits)")


def _is_sae_site(site) -> bool:
    return (isinstance(site, dict) and set(site) == {"block", "width", "offset", "activation", "k"}
            and _is_int(site["block"]) and _is_int(site["width"], 1) and _is_int(site["offset"])
            and isinstance(site["activation"], str) and (site["k"] is None or _is_int(site["k"], 1)))


def _check_steering_section(config: dict, config_path: Path) -> None:
    """`steering` is null or names a checksummed file and its row classes: unique names, each
    one of the bundle's classes, with per-row provenance for every row or none."""
    index = config.get("steering")
    if index is None:
        return
    _expect(config_path, "steering", index, isinstance(index, dict), "null or an object (file, classes, info)")
    file = index.get("file", _MISSING)
    _expect(config_path, "steering.file", file, isinstance(file, str) and file in config["files"],
            f"one of the checksummed files {sorted(config['files'])}")
    classes = index.get("classes", _MISSING)
    _expect(config_path, "steering.classes", classes, _is_list_of(classes, lambda c: isinstance(c, str)),
            "a list of class names, one per steering row")
    repeated = repeated_names(classes)
    _expect(config_path, "steering.classes", classes, not repeated, f"free of repeated names, found {repeated}")
    foreign = names_outside(classes, config["class_names"])
    _expect(config_path, "steering.classes", classes, not foreign,
            f"names among class_names, found {foreign[:8]}")
    info = index.get("info", [])
    _expect(config_path, "steering.info", info, isinstance(info, list) and len(info) in (0, len(classes)),
            f"a list with one entry per steering row ({len(classes)}) or none")


def _check_header_types(config: dict, config_path: Path) -> None:
    """Every section has the type and form save_bundle writes, so a hand-edited or damaged
    header fails here with the field named instead of deep inside loading or predicting."""
    _check_files_section(config, config_path)
    _check_model_section(config, config_path)
    size = config["image_size"]
    _expect(config_path, "image_size", size, _is_list_of(size, lambda v: _is_int(v, 1)) and len(size) == 2,
            "[height, width] in pixels")
    _expect(config_path, "in_chans", config["in_chans"], _is_int(config["in_chans"], 1), "a positive channel count")
    _expect(config_path, "num_heads", config["num_heads"], _is_int(config["num_heads"], 1), "a positive head count")
    _expect(config_path, "gated_blocks", config["gated_blocks"], _is_list_of(config["gated_blocks"], _is_int),
            "a list of block indices")
    _expect(config_path, "steer_width", config["steer_width"], _is_int(config["steer_width"]), "a latent count (an integer >= 0)")
    names = config["class_names"]
    _expect(config_path, "class_names", names, _is_list_of(names, lambda c: isinstance(c, str)) and len(names) > 0,
            "a non-empty list of class names")
    repeated = repeated_names(names)
    _expect(config_path, "class_names", names, not repeated, f"free of repeated names, found {repeated}")
    _expect(config_path, "sae_sites", config["sae_sites"], _is_list_of(config["sae_sites"], _is_sae_site),
            "a list of {block, width, offset, activation, k} objects, one per SAE")
    _expect(config_path, "extra", config.get("extra", {}), isinstance(config.get("extra", {}), dict), "an object")
    _check_normalization_section(config, config_path)
    _check_steering_section(config, config_path)


def _check_regular_file(file_path: Path) -> None:
    """A bundle file must be (or link to) a regular file. Links are followed: stores such as the
    Hugging Face Hub cache, DVC and git-annex keep a folder's files as links into a blob store, and
    the checksums say the content is the bundle's own; a link to a device, a pipe or a folder (whose
    read would hang or fail midway) is refused."""
    if not file_path.is_file():
        raise BundleError(f"bundle file {file_path} is not a regular file (or a link to one)")


def read_bundle_config(path: Union[str, Path]) -> dict:
    """Parse and validate `headsteer.json` (format, version, the type of every section, checksums)
    without building the model."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory (expected a folder holding {CONFIG_FILE})")
    if not (config_path.exists() or config_path.is_symlink()):
        raise BundleError(f"{path} has no {CONFIG_FILE}; not a headsteer bundle")
    _check_regular_file(config_path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{config_path} is not valid JSON ({error}); the bundle is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise BundleError(f"{config_path} is not a {FORMAT_NAME} file")
    version = config.get("format_version")
    if not _is_int(version):
        raise BundleError(f"{config_path} has no integer format_version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version} is newer than this headsteer supports ({FORMAT_VERSION}); upgrade headsteer"
        )
    required = ("model", "image_size", "in_chans", "normalization", "class_names", "num_heads", "gated_blocks",
                "sae_sites", "files", "steer_width")
    for key in required:
        if key not in config:
            raise BundleError(f"{config_path} lacks the required key {key!r}")
    _check_header_types(config, config_path)
    for name, digest in config["files"].items():
        file_path = path / name
        if not (file_path.exists() or file_path.is_symlink()):
            raise BundleError(f"bundle file {file_path} is missing")
        _check_regular_file(file_path)
        if _sha256(file_path) != digest:
            raise BundleError(f"bundle file {file_path} does not match its recorded checksum (corrupt or truncated)")
    return config


def _load_tensors(file_path: Path) -> dict:
    try:
        return load_file(file_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"cannot read {file_path}: {error}") from None


def _count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or infinite values a floating tensor holds (0 for other dtypes)."""
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def _loads_exactly(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Whether a tensor of dtype `stored` loads into a model tensor of dtype `expected` unchanged:
    float16 / bfloat16 weights (a half-precision model's) widen to float32 exactly, float64 would be
    rounded (save_bundle refuses it)."""
    return (stored.is_floating_point == expected.is_floating_point
            and torch.promote_types(stored, expected) == expected)


def _build_model(config: dict, config_path: Path) -> GatedViT:
    """The (untrained) GatedViT the header's model section describes; BundleError if timm or
    GatedViT refuse it (timm reports e.g. a width not divisible by num_heads as an AssertionError,
    a patch size of 0 as a ZeroDivisionError, an img_size of one number as an IndexError)."""
    # (`_check_model_section` allowed only timm_name, timm_kwargs and MODEL_OPTIONS)
    options = {key: value for key, value in config["model"].items() if key not in ("timm_name", "timm_kwargs")}
    name, timm_kwargs = config["model"]["timm_name"], config["model"]["timm_kwargs"]
    try:
        return GatedViT.from_timm(name, timm_kwargs=timm_kwargs, **options)
    except UnsupportedModelError:
        raise  # already names the timm model or variant headsteer cannot wrap
    except Exception as error:
        raise BundleError(
            f"{config_path}: the model section (timm {name!r}, timm_kwargs {_shown(timm_kwargs)}) "
            f"cannot be built: {type(error).__name__}: {error}; the bundle is corrupt"
        ) from None


def _check_header_matches_model(config: dict, model: GatedViT, config_path: Path) -> None:
    """The header's shapes are what the Engine and exporters trust: each must be the model's own."""
    fields = (  # (name, the header's value, the model's)
        ("class_names (count)", len(config["class_names"]), model.vit.num_classes),
        ("steer_width", config["steer_width"], model.steer_width),
        ("image_size", list(config["image_size"]), list(model.image_size)),
        ("in_chans", config["in_chans"], model.vit.patch_embed.proj.in_channels),
        ("num_heads", config["num_heads"], model.num_heads),
        ("gated_blocks", list(config["gated_blocks"]), list(model.gate_blocks)),
        ("sae_sites", config["sae_sites"], _sae_sites(model)),
    )
    for field_name, recorded, actual in fields:
        if recorded != actual:
            raise BundleError(
                f"{config_path}: {field_name} is {recorded}, but the model it describes has {actual}; "
                "the bundle is corrupt or mismatched"
            )


def _load_steering(table_path: Path, index: dict, steer_width: int) -> SteeringTable:
    """The steering table at `table_path`: exactly steer_scale and steer_shift, each float32 (what
    save_bundle writes) of shape [rows in `index`, steer_width] and finite (a NaN or infinite row
    would steer its class's outputs to NaN); BundleError naming the file and tensor otherwise."""
    rows = _load_tensors(table_path)
    if set(rows) != {"steer_scale", "steer_shift"}:
        raise BundleError(f"{table_path} must hold exactly steer_scale and steer_shift, has {sorted(rows)}")
    shape = [len(index["classes"]), steer_width]
    for name, tensor in rows.items():
        if list(tensor.shape) != shape:
            raise BundleError(f"{table_path}: {name} must be {shape} (one row per class in steering.classes, "
                              f"steer_width wide), has shape {list(tensor.shape)}; the bundle is corrupt")
        if tensor.dtype != torch.float32:
            raise BundleError(f"{table_path}: {name} must be float32, is {tensor.dtype}; the bundle is corrupt")
        if _count_non_finite(tensor):
            raise BundleError(f"{table_path}: {name} holds {_count_non_finite(tensor)} non-finite value(s) "
                              "(NaN or infinity); the bundle is corrupt")
    try:
        return SteeringTable(index["classes"], rows["steer_scale"], rows["steer_shift"], index.get("info", []))
    except InputError as error:
        raise BundleError(f"{table_path}: {error}") from None


def load_bundle(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> tuple[GatedViT, BundleInfo]:
    """Rebuild the GatedViT saved at `path` (eval mode) and its BundleInfo."""
    path = Path(path)
    config = read_bundle_config(path)
    model = _build_model(config, path / CONFIG_FILE)
    state = _load_tensors(path / WEIGHTS_FILE)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{path / WEIGHTS_FILE} does not match the model in {CONFIG_FILE}: "
            f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name_, tensor in state.items():
        if tensor.shape != expected[name_].shape:
            raise BundleError(
                f"tensor {name_} in {path / WEIGHTS_FILE} has shape {list(tensor.shape)}; "
                f"the model expects {list(expected[name_].shape)}"
            )
        if tensor.is_floating_point() != expected[name_].is_floating_point():
            raise BundleError(
                f"tensor {name_} in {path / WEIGHTS_FILE} is {tensor.dtype}; the model expects {expected[name_].dtype} "
                "(a float type)"
            )
        # (float64 weights, which bundles saved before save_bundle refused them hold, load rounded
        # to float32 as .float() rounds them; a value past float32's range is refused below)
        tensor = state[name_] = tensor.to(expected[name_].dtype)
        if _count_non_finite(tensor):
            raise BundleError(
                f"tensor {name_} in {path / WEIGHTS_FILE} holds {_count_non_finite(tensor)} non-finite value(s) "
                "(NaN or infinity), which would poison the model's outputs; the bundle is corrupt"
            )
    _check_header_matches_model(config, model, path / CONFIG_FILE)
    steering = None
    if config.get("steering"):
        steering = _load_steering(path / config["steering"]["file"], config["steering"], model.steer_width)
    model.load_state_dict(state)
    model.eval().to(map_location)
    norm = config["normalization"]
    info = BundleInfo(
        path=path,
        config=config,
        class_names=list(config["class_names"]),
        mean=tuple(norm["mean"]),
        std=tuple(norm["std"]),
        steering=steering,
        extra=config.get("extra", {}),
    )
    return model, info
