"""TFLite files from the serving SavedModels, and what is inside them.

Variants (README, "Outputs"): `float32`; `float16` (weights stored in
half precision); `dynamic` (int8 weights, float activations); `int8` (int8
weights and activations, calibrated on a representative set); and, through
ai-edge-quantizer on the float32 file, `int8_weights` and `int4_weights`
(weight-only: weights stored in 8 or 4 bits per channel, dequantised to
float before each op, so the arithmetic stays float32); `mixed` is int4
weight-only with the layers that int4 would cost accuracy kept in int8 or
float, chosen on validation data (`exporters.mixed.convert_mixed`).  The
uint8 image input and float32 outputs stay as they are in every variant, so
one calling convention fits all files.  The files are converted from the static
SavedModel of `static_savedmodel`: each signature takes one image
`[1, S, S, 3]` at the model's size and returns `logits` (output index 0)
and `probabilities` (index 1).

The converter de-duplicates constant buffers by their bytes, not by the
variables they came from: a multi-signature file stores the universal
weights once only if every signature's copy is bit-identical.  In a
full-integer (int8) file a few channels' int8 weights follow each
signature's input scale; `share_int8_kernels` makes them one kernel
again (`convert` applies it).  `inspect` reads a file's flatbuffer to show
how many weight buffers are shared and which tensor types each signature
ended up with (an int8 conversion can silently leave a signature in float,
TensorFlow issue 52145).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import io
import os
import re
import tempfile
from typing import Callable, Iterable, Iterator

import flatbuffers
import numpy as np
import tensorflow as tf
# LiteRT publishes the flatbuffer schema it reads; TensorFlow's copy is private.
from ai_edge_litert import schema_py_generated as schema

from exporters import savedmodel
from nettailor_tf.common import quiet
from nettailor_tf.common.errors import NetTailorError, first_line

VARIANTS = ("float32", "float16", "dynamic", "int8", "int8_weights", "int4_weights", "mixed")
# The weight-only variants and their bits: ai-edge-quantizer recipes applied
# to the float32 file (the TFLite converter has no weight-only int4).
WEIGHT_ONLY_BITS = {"int8_weights": 8, "int4_weights": 4}


class ConversionError(NetTailorError, RuntimeError):
    """The TFLite converter refused a model."""


def apply_recipe(float_content: bytes, rules: list[dict]) -> bytes:
    """A .tflite file quantised by ai-edge-quantizer's `rules` (a recipe:
    a list of {regex, operation, algorithm_key, op_config})."""
    from ai_edge_quantizer import quantizer

    # Its progress bar ignores `enable_progress_bar` (0.10.0): keep it off
    # the run's log.
    with contextlib.redirect_stderr(io.StringIO()):
        model = quantizer.Quantizer(bytearray(float_content))
        model.load_quantization_recipe(rules)
        result = model.quantize(enable_progress_bar=False, enable_progress_report=False)
    return bytes(result.quantized_model)


def quantize_weights(float_content: bytes, bits: int) -> bytes:
    """A float32 .tflite with its weights stored in `bits` (8 or 4) bits,
    per channel, by ai-edge-quantizer's weight-only recipe.  Every signature
    quantises a shared buffer the same way, so a bundle's universal weights
    stay stored once."""
    from ai_edge_quantizer import recipe

    chosen = {8: recipe.weight_only_wi8_afp32, 4: recipe.weight_only_wi4_afp32}[bits]()
    try:
        return apply_recipe(float_content, chosen)
    except Exception as error:  # the quantizer raises many unrelated types
        first = first_line(error)
        raise ConversionError(f"{bits}-bit weight-only quantisation failed: {first}") from None


def convert(savedmodel_dir: str, signature_keys: list[str], variant: str,
            calibration: Callable[[], Iterable[np.ndarray]] | None = None,
            float_content: bytes | None = None) -> bytes:
    """One variant of a SavedModel's signatures (`Converter.convert`)."""
    return Converter(savedmodel_dir, signature_keys).convert(variant, calibration, float_content)


class Converter:
    """The listed signatures of one SavedModel as .tflite files, through ONE
    TFLiteConverter (`from_saved_model` loads the whole SavedModel: 0.4-2 s a
    network on the quickstart); each variant sets every option anew."""

    _converter = None  # made by the first conversion

    def __init__(self, savedmodel_dir: str, signature_keys: list[str]):
        self.savedmodel_dir, self.signature_keys = savedmodel_dir, list(signature_keys)

    def convert(self, variant: str, calibration: Callable[[], Iterable[np.ndarray]] | None = None,
                float_content: bytes | None = None) -> bytes:
        """`calibration` (int8): uint8 image batches at the model's size, each
        image fed alone to EVERY signature (samples for some leave the others
        float, silently; images per signature would quantise the shared layers
        per task); a multi-signature int8 file gets one kernel per universal
        layer (`share_int8_kernels`).  Weight-only variants quantise the
        float32 file (`float_content`, or converted here)."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown TFLite variant {variant!r}; accepted: "
                             f"{', '.join(VARIANTS)}")
        if variant == "mixed":
            raise ValueError("the mixed variant is chosen on labelled images: use "
                             "exporters.mixed.convert_mixed")
        if variant in WEIGHT_ONLY_BITS:
            return quantize_weights(float_content or self.convert("float32"),
                                    WEIGHT_ONLY_BITS[variant])
        if variant == "int8" and calibration is None:
            raise ValueError("the int8 variant needs calibration images")
        try:
            with quiet.native_stderr_filtered(), collecting_new_objects_only():
                self._converter = self._converter or tf.lite.TFLiteConverter.from_saved_model(
                    self.savedmodel_dir, signature_keys=self.signature_keys)
                _set_options(self._converter, variant, calibration, self.signature_keys)
                content = self._converter.convert()
        except Exception as error:  # the converter raises many unrelated types
            raise ConversionError(f"TFLite {variant} conversion of {self.savedmodel_dir} "
                                  f"failed: {first_line(error)}") from error
        # The converter's int8 weights can differ per signature (see
        # `share_int8_kernels`); the other variants' do not.
        return share_int8_kernels(content) \
            if variant == "int8" and len(self.signature_keys) > 1 else content


def _set_options(converter, variant: str, calibration, signature_keys: list[str]) -> None:
    """Every option a variant reads (a new converter's value where it sets none)."""
    converter.optimizations = set() if variant == "float32" else [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16] if variant == "float16" else set()
    converter.target_spec.supported_ops = (
        [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] if variant == "int8"
        else {tf.lite.OpsSet.TFLITE_BUILTINS})
    converter.representative_dataset = (lambda: (  # every image alone, to every signature
        (key, {savedmodel.INPUT_NAME: image[None]}) for images in calibration()
        for image in np.asarray(images, np.uint8) for key in signature_keys)) \
        if variant == "int8" else None


@contextlib.contextmanager
def collecting_new_objects_only():
    """The converter's gc.collect() (after a SavedModel load, TF 2.21) walks all
    objects: 0.4-1.6 s a conversion on the quickstart.  Older ones sit it out
    (and any a caller froze are thawed after); the conversion's are collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def static_savedmodel(endpoints: dict[str, savedmodel.Endpoint]) -> Iterator[str]:
    """A temporary SavedModel of `endpoints` whose signatures take one image
    [1, S, S, 3]: what the .tflite files are converted from (the kept
    SavedModel, for servers, takes any size)."""
    with tempfile.TemporaryDirectory(prefix="nettailor_static_") as folder:
        path = os.path.join(folder, "savedmodel")
        savedmodel.write_savedmodel(path, endpoints, static=True)
        yield path


# --- what is inside a file ------------------------------------------------------

_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


@dataclasses.dataclass
class Contents:
    """Facts read from a .tflite flatbuffer."""
    bytes: int
    # Signature key -> {tensor type name: number of constant tensors}.
    weight_types: dict[str, dict[str, int]]
    # Signature key -> {op name: count}.
    ops: dict[str, dict[str, int]]
    weight_buffers: int          # distinct non-empty buffers
    weight_references: int       # constant tensors pointing at them (all subgraphs)
    shared_buffers: int          # buffers used by more than one subgraph
    weight_bytes: int            # bytes in all distinct buffers


def inspect(content: bytes) -> Contents:
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    buffers = model.buffers or []
    opcodes = model.operatorCodes or []
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    subgraph_keys = {}
    for signature in model.signatureDefs or []:
        key = signature.signatureKey
        subgraph_keys[signature.subgraphIndex] = key.decode() if isinstance(key, bytes) else key

    def buffer_size(index: int) -> int:
        buffer = buffers[index] if 0 <= index < len(buffers) else None
        if buffer is None:
            return 0
        if buffer.data is not None:
            return len(buffer.data)
        return int(buffer.size or 0)  # stored outside the flatbuffer (large models)

    users = collections.defaultdict(set)
    weight_types, ops, references = {}, {}, 0
    for index, subgraph in enumerate(model.subgraphs or []):
        key = subgraph_keys.get(index, f"subgraph{index}")
        types = collections.Counter()
        for tensor in subgraph.tensors or []:
            if tensor.buffer and buffer_size(tensor.buffer) > 0:
                types[_TYPE_NAMES.get(tensor.type, str(tensor.type))] += 1
                users[tensor.buffer].add(index)
                references += 1
        weight_types[key] = dict(types)
        counts = collections.Counter()
        for op in subgraph.operators or []:
            code = opcodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            counts[op_names.get(builtin, str(builtin))] += 1
        ops[key] = dict(counts)
    return Contents(
        bytes=len(content), weight_types=weight_types, ops=ops, weight_buffers=len(users),
        weight_references=references,
        shared_buffers=sum(len(s) > 1 for s in users.values()),
        weight_bytes=sum(buffer_size(b) for b in users))


def float_weights(contents: Contents, key: str) -> int:
    """Constant float32 tensors left in one signature (weights a full-int8
    conversion should have quantised; biases are int32 there)."""
    return contents.weight_types.get(key, {}).get("FLOAT32", 0)


# --- what a bundle stores once, and what per task ------------------------------------

# Layers whose weights belong to every task (the static model's names): the
# stem, the universal blocks and the backbone's head.  Proxies are
# `block<l>_proxy_from<s>`, gates `gate<l>_universal`: task-specific.
UNIVERSAL_LAYER = r"(stem|head|block\d+)"
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclasses.dataclass
class Sharing:
    """How a multi-signature file stores its constants."""
    shared_bytes: int                 # buffers read by two or more signatures
    task_bytes: dict[str, int]        # signature -> bytes of buffers only it reads
    # Universal layers (`block13/expand`, ...) used by two or more signatures
    # whose weights are not one buffer: copies per task.
    copies: list[str]
    universal_ops: int                # universal weight ops used by two or more signatures
    # Signature -> bytes of `task_bytes` that universal layers run by two or
    # more signatures read: an int8 file's int32 biases (their scale is the
    # input's times the weight's, and the input's follows each task's
    # activations), and any copies.
    universal_task_bytes: dict[str, int]

    def summary(self) -> dict:
        return {"shared_weight_bytes": self.shared_bytes,
                "task_weight_bytes": dict(self.task_bytes),
                "universal_copies": list(self.copies),
                "universal_ops_shared": self.universal_ops - len(self.copies),
                "universal_task_weight_bytes": dict(self.universal_task_bytes)}


def _layer_of(tensor_name: str, universal: str) -> str | None:
    """The universal layer an op's weight belongs to, from its tensor's name
    (`nettailor_digits_1/block13_1/expand_1/conv_1/convolution` ->
    `block13/expand`; fused ops join several names with ";"): the model's
    name (one per signature) and Keras's call-count suffixes dropped.  None
    for task-specific layers."""
    for name in tensor_name.split(";"):
        parts = [re.sub(r"_\d+$", "", part) for part in name.split("/")[1:]]
        if parts and re.fullmatch(universal, parts[0]):
            return "/".join(parts[:2])
    return None


def _constant_inputs(model, subgraph, op, producers) -> list[int]:
    """Buffers of an op's constant inputs, through the DEQUANTIZE that a
    float16 (or weight-only) file puts between a stored weight and its op;
    int32 ones are left out: an int8 file's biases, whose scale is the
    input's scale times the weight's and so follows each task's activations."""
    found = []
    for index in op.inputs if op.inputs is not None else []:
        if index < 0:
            continue
        tensor = subgraph.tensors[index]
        buffer = model.buffers[tensor.buffer] if tensor.buffer else None
        if buffer is None or buffer.data is None or len(buffer.data) == 0:
            source = producers.get(index)
            if source is None or source.inputs is None or len(source.inputs) == 0:
                continue
            tensor = subgraph.tensors[source.inputs[0]]
            buffer = model.buffers[tensor.buffer] if tensor.buffer else None
            if buffer is None or buffer.data is None or len(buffer.data) == 0:
                continue
        if tensor.type != schema.TensorType.INT32:
            found.append(tensor.buffer)
    return found


def _weight_ops(model, universal: str):
    """(signature key, subgraph, op, universal layer or None) for every
    CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op of every subgraph."""
    keys = _signature_keys(model)
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for index, subgraph in enumerate(model.subgraphs or []):
        for op in subgraph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            kind = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if kind in _WEIGHT_OPS and op.inputs is not None and len(op.inputs) > 1 \
                    and op.inputs[1] >= 0:
                layer = _layer_of(subgraph.tensors[op.inputs[1]].name.decode(), universal)
                yield keys.get(index, f"subgraph{index}"), subgraph, op, layer


def _signature_keys(model) -> dict[int, str]:
    return {s.subgraphIndex: (s.signatureKey.decode() if isinstance(s.signatureKey, bytes)
                              else s.signatureKey) for s in model.signatureDefs or []}


def sharing(content: bytes, universal: str = UNIVERSAL_LAYER) -> Sharing:
    """Reads which constant buffers each signature of a file uses, and
    whether every universal layer (its op name's layer matches `universal`)
    that several signatures run reads the same buffers in all of them."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    keys = _signature_keys(model)
    users = collections.defaultdict(set)
    producers_in = {}
    for index, subgraph in enumerate(model.subgraphs or []):
        key = keys.get(index, f"subgraph{index}")
        producers = producers_in[id(subgraph)] = {
            out: op for op in subgraph.operators or []
            for out in (op.outputs if op.outputs is not None else [])}
        for op in subgraph.operators or []:
            for buffer in _constant_inputs(model, subgraph, op, producers):
                users[buffer].add(key)
        for tensor in subgraph.tensors or []:  # int32 biases and anything else constant
            buffer = model.buffers[tensor.buffer] if tensor.buffer else None
            if buffer is not None and buffer.data is not None and len(buffer.data):
                users[tensor.buffer].add(key)
    weights = collections.defaultdict(dict)  # layer path -> signature -> buffers
    read = collections.defaultdict(set)  # layer path -> every constant, int32 biases too
    for key, subgraph, op, layer in _weight_ops(model, universal):
        if layer is not None:
            weights[layer][key] = tuple(_constant_inputs(model, subgraph, op,
                                                         producers_in[id(subgraph)]))
            read[layer] |= set(weights[layer][key])
            read[layer] |= {subgraph.tensors[i].buffer for i in op.inputs if i >= 0}
    used_by_several = {p: b for p, b in weights.items() if len(b) > 1}
    universal_buffers = set().union(*(read[p] for p in used_by_several))
    size = {b: len(model.buffers[b].data) for b in users}
    task_bytes = {key: 0 for key in keys.values()}
    universal_task_bytes = dict(task_bytes)
    for buffer, readers in users.items():
        if len(readers) == 1:
            reader = next(iter(readers))
            task_bytes[reader] = task_bytes.get(reader, 0) + size[buffer]
            if buffer in universal_buffers:
                universal_task_bytes[reader] = universal_task_bytes.get(reader, 0) + size[buffer]
    copies = sorted(p for p, b in used_by_several.items() if len(set(b.values())) > 1)
    return Sharing(sum(size[b] for b, r in users.items() if len(r) > 1), task_bytes, copies,
                   len(used_by_several), universal_task_bytes)


# --- one int8 kernel per universal layer -------------------------------------------------

_INT32_LIMIT = np.iinfo(np.int32).max


def share_int8_kernels(content: bytes, universal: str = UNIVERSAL_LAYER) -> bytes:
    """A full-integer file whose universal layers read one int8 kernel in
    every signature.

    The converter enlarges a channel's weight scale until the int32 bias
    fits, bias / (input scale x weight scale) within half of int32's range
    (`AdjustWeightsForBiasScale`, TensorFlow Lite's quantisation utilities).
    That hits channels whose folded weights are near zero and whose bias is
    not (a batch norm that switched a channel off): the enlarged scale
    follows each signature's input scale, so such a channel's int8 weights,
    and with them the layer's buffer, differ per task.  Here every channel
    takes the largest of the signatures' scales (the one the converter gave
    the signature whose input scale is smallest: valid for all, its bias
    only smaller) with that signature's int8 weights, and each signature's
    bias is requantised to its new scale.  Channels no signature adjusted
    keep their bytes; the ops and their cost are unchanged.  A layer whose
    copies do not dequantise to the same weights within a step is left as
    it is."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    uses = collections.defaultdict(list)
    for _, subgraph, op, layer in _weight_ops(model, universal):
        if layer is not None and len(op.inputs) > 2 and op.inputs[2] >= 0 \
                and subgraph.tensors[op.inputs[1]].type == schema.TensorType.INT8:
            uses[layer].append((subgraph, op))
    changed = False
    for found in uses.values():
        if len({s.tensors[op.inputs[1]].buffer for s, op in found}) > 1:
            changed |= _one_kernel(model, found)
    if not changed:
        return content
    _empty_unused_buffers(model)
    return _pack(model)


def _buffer_array(model, tensor, dtype) -> np.ndarray:
    data = model.buffers[tensor.buffer].data
    return np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype)


def _one_kernel(model, uses) -> bool:
    """Points every use's weight tensor at one int8 kernel (the coarsest
    scale per channel) and requantises each use's int32 bias to it; False,
    touching nothing, when the copies are not the same weights."""
    weight_tensors = [s.tensors[op.inputs[1]] for s, op in uses]
    bias_tensors = [s.tensors[op.inputs[2]] for s, op in uses]
    first = weight_tensors[0]
    axis = first.quantization.quantizedDimension
    shape = tuple(first.shape)
    if any(tuple(t.shape) != shape or t.quantization.quantizedDimension != axis
           or t.quantization.scale is None or len(t.quantization.scale) != shape[axis]
           for t in weight_tensors) \
            or any(t.type != schema.TensorType.INT32 for t in bias_tensors) \
            or any(model.buffers[t.buffer].data is None  # stored outside the flatbuffer
                   for t in weight_tensors + bias_tensors):
        return False
    # [use, channel, rest]: each use's kernel by output channel.
    kernels = np.stack([np.moveaxis(_buffer_array(model, t, np.int8).reshape(shape), axis, 0)
                        .reshape(shape[axis], -1) for t in weight_tensors])
    scales = np.stack([np.asarray(t.quantization.scale, np.float64) for t in weight_tensors])
    coarsest = scales.argmax(0)
    common = scales.max(0)
    kernel = kernels[coarsest, np.arange(shape[axis])]
    # Each copy rounds the same float weights: within half of its step and
    # half of the common step of the shared kernel.
    error = np.abs(kernels * scales[:, :, None] - kernel * common[:, None])
    if np.any(error > (scales[:, :, None] + common[:, None]) * (0.5 + 1e-6)):
        return False
    biases = [np.round(_buffer_array(model, t, np.int32).astype(np.float64) * s / common)
              for t, s in zip(bias_tensors, scales)]
    if any(np.abs(b).max() > _INT32_LIMIT for b in biases):
        return False
    restored = np.moveaxis(kernel.reshape((shape[axis],) + tuple(np.delete(shape, axis))), 0, axis)
    shared = _new_buffer(model, restored.astype(np.int8))
    for weight, bias, old_scale, new_bias in zip(weight_tensors, bias_tensors, scales, biases):
        weight.buffer = shared
        weight.quantization.scale = common.astype(np.float32).tolist()
        if np.any(old_scale != common):
            bias.buffer = _new_buffer(model, new_bias.astype(np.int32))
            # A bias's scale is the input's times the weight's, per channel.
            bias.quantization.scale = (np.asarray(bias.quantization.scale, np.float64)
                                       / old_scale * common).astype(np.float32).tolist()
    return True


def _new_buffer(model, values: np.ndarray) -> int:
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(values.tobytes(), np.uint8)
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _empty_unused_buffers(model) -> None:
    """Drops the bytes of buffers no tensor or metadata reads any more (the
    entries stay: tensors name buffers by index)."""
    used = {t.buffer for s in model.subgraphs or [] for t in s.tensors or []}
    used |= {m.buffer for m in model.metadata or []}
    for index, buffer in enumerate(model.buffers):
        if index not in used and buffer.data is not None:
            buffer.data = None


class _AlignedBuilder(flatbuffers.Builder):
    """Writes byte vectors (buffers' data) 16-byte aligned, as the schema
    asks of `Buffer.data` (`force_align: 16`): kernels read int32 biases in
    place, and the generated Python code aligns a byte vector to 1 only."""

    def CreateNumpyVector(self, x):
        if x.dtype != np.uint8:
            return super().CreateNumpyVector(x)
        self.StartVector(1, x.size, 16)
        payload = x.tobytes(order="C")
        self.head = self.head - len(payload)
        self.Bytes[self.head:self.head + len(payload)] = payload
        self.vectorNumElems = x.size
        return self.EndVector()


def _pack(model) -> bytes:
    builder = _AlignedBuilder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
