"""The `mixed` TFLite variant: 4-bit weights where they cost nothing, float
where they cost accuracy.

Weight-only int4 makes a file about a third of float32's size, but some
layers do not survive it (on the quickstart, the whole-network int4 file lost
6-11 points).  The recipe here measures which:

1. Sensitivity, per layer: every convolution and dense layer's weights are
   rounded to int4 (per output channel, symmetric, as ai-edge-quantizer's
   weight-only recipe does) alone, in a copy of the float32 file, and the
   file is run on a few validation images; the layer's sensitivity is how
   far the logits move (mean squared change over the logits' variance).
   Rounding in place keeps float32 arithmetic, so each try is a buffer patch
   and an interpreter, not a conversion.
2. Selection: the k most sensitive layers stay float, the rest are int4;
   the smallest k whose validation accuracy is within the budget of the
   float32 file's is found by bisection (accuracy rises with k, give or take
   an image), on the same in-place rounding.
3. The file: ai-edge-quantizer's weight-only int4 recipe, with the chosen
   layers excluded (`NO_QUANTIZE`, matched by their op's output tensor
   names), checked once more on the validation split; should the real
   quantiser round differently enough to miss the budget, more layers stay
   float until it is met.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from exporters import savedmodel, tflite
from nettailor_tf.common.errors import first_line

# Convolutions and dense layers: the ops whose weights the weight-only recipe
# quantises (input 1), and the axis of their output channels.
_WEIGHT_OPS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
# Validation images each layer's sensitivity is measured on.
SENSITIVITY_IMAGES = 64


@dataclasses.dataclass
class WeightOp:
    """One quantisable op of a single-signature file."""
    index: int          # in subgraph 0
    kind: str           # CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED
    buffer: int         # the weight tensor's buffer
    shape: tuple
    channel_axis: int
    scope: str          # what ai-edge-quantizer's recipe regexes are matched against


def weight_ops(content: bytes) -> list[WeightOp]:
    """The float32 weight-bearing ops of a single-signature .tflite file."""
    model = schema.Model.GetRootAs(content, 0)
    subgraph = model.Subgraphs(0)
    found = []
    for index in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = _OP_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        if kind not in _WEIGHT_OPS or op.InputsLength() < 2:
            continue
        weight = subgraph.Tensors(op.Inputs(1))
        if weight.Type() != schema.TensorType.FLOAT32 or weight.Buffer() <= 0:
            continue
        if model.Buffers(weight.Buffer()).DataLength() == 0:
            continue
        if kind == "DEPTHWISE_CONV_2D" and tuple(weight.ShapeAsNumpy())[1:3] == (1, 1):
            # A 1x1 depthwise kernel is a gate's per-channel scale
            # (`static_graph.Scale`), not a layer's weights: nothing to quantise.
            continue
        outputs = [subgraph.Tensors(op.Outputs(i)).Name().decode()
                   for i in range(op.OutputsLength()) if op.Outputs(i) >= 0]
        found.append(WeightOp(index, kind, weight.Buffer(), tuple(weight.ShapeAsNumpy()),
                              _WEIGHT_OPS[kind], ";".join(outputs)))
    return found


def fake_quantize(weights: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """Symmetric per-channel rounding to `bits`, back in float."""
    top = 2 ** (bits - 1) - 1
    reduce = tuple(a for a in range(weights.ndim) if a != axis)
    scale = np.max(np.abs(weights), axis=reduce, keepdims=True) / top
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(weights / scale), -top - 1, top) * scale).astype(np.float32)


def with_rounded_weights(content: bytes, ops: list[WeightOp], bits: int = 4,
                         others: list[WeightOp] = (), other_bits: int | None = None) -> bytes:
    """A copy of the float32 file whose `ops` have their weights rounded to
    `bits` in place (float arithmetic, the quantised values), and `others`
    to `other_bits` (None: left float)."""
    patched = bytearray(content)
    model = schema.Model.GetRootAs(patched, 0)
    rounding = [(op, bits) for op in ops] + [(op, other_bits) for op in others if other_bits]
    for op, bits in rounding:
        view = model.Buffers(op.buffer).DataAsNumpy()  # a view into `patched`
        weights = view.view(np.float32).reshape(op.shape)
        weights[...] = fake_quantize(weights, op.channel_axis, bits)
    return bytes(patched)


def logits(content: bytes, images: np.ndarray, threads: int = 1) -> np.ndarray:
    """The file's logits for uint8 images [N, S, S, 3], one at a time."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=content, num_threads=threads).get_signature_runner(
        savedmodel.SERVING_KEY)
    return np.concatenate([runner(**{savedmodel.INPUT_NAME: image[None]})["logits"]
                           for image in images])


def sensitivities(content: bytes, ops: list[WeightOp], images: np.ndarray,
                  threads: int = 1) -> list[float]:
    """For each op, the logits' mean squared change (over their variance)
    when only that op's weights are rounded to int4."""
    reference = logits(content, images, threads)
    spread = float(np.var(reference)) or 1.0
    return [float(np.mean((logits(with_rounded_weights(content, [op]), images, threads)
                           - reference) ** 2)) / spread for op in ops]


def quantize(content: bytes, kept: list[WeightOp], kept_bits: int | None = 8) -> bytes:
    """ai-edge-quantizer's weight-only int4 recipe, with the `kept` ops'
    weights in `kept_bits` (8) or float (None)."""
    from ai_edge_quantizer import recipe

    rules = recipe.weight_only_wi4_afp32()
    if kept_bits is None:
        rule = {"operation": "*", "algorithm_key": "no_quantize", "op_config": {}}
    else:
        rule = {**recipe.weight_only_wi8_afp32()[0]}
    # The quantiser's scope of an op is its output names, each followed by
    # ";"; a later rule overrides an earlier one.
    rules += [{**rule, "regex": f"^{re.escape(op.scope)};$"} for op in kept]
    return tflite.apply_recipe(content, rules)


@dataclasses.dataclass
class MixedChoice:
    content: bytes
    layers: int              # weight-bearing ops in the file
    kept_layers: list[str]   # the scopes kept out of int4, most sensitive first
    kept_bits: int | None    # what they are stored in: 8 bits, or float (None)
    float_accuracy: float    # the float32 file's, on the selection images
    accuracy: float          # the mixed file's, on the same images
    all_int4_accuracy: float
    budget: float  # what it was held to: at least one of the images

    def summary(self) -> dict:
        return {"layers": self.layers, "kept_layers": len(self.kept_layers),
                "kept_as": "float32" if self.kept_bits is None else f"int{self.kept_bits}",
                "kept_layer_names": self.kept_layers, "budget": self.budget,
                "selection_accuracy": self.accuracy,
                "selection_float32_accuracy": self.float_accuracy,
                "selection_all_int4_accuracy": self.all_int4_accuracy,
                "met_budget": self.accuracy >= self.float_accuracy - self.budget - 1e-12}


def choose_mixed(content: bytes, images: np.ndarray, labels: np.ndarray, budget: float,
                 kept_bits: int | None = 8, threads: int = 1) -> MixedChoice:
    """The int4 file with the fewest layers kept in `kept_bits` (8, or None:
    float) whose accuracy on (`images`, `labels`) is within `budget` of the
    float32 file's."""
    ops = weight_ops(content)

    def accuracy(candidate: bytes) -> float:
        return float(np.mean(np.argmax(logits(candidate, images, threads), 1) == labels))

    # A budget finer than one image asks for perfection (on digits' 145
    # validation images, 0.5 points is 0.7 of one): allow at least one.
    budget = max(budget, 1.0 / max(len(labels), 1))
    float_accuracy = accuracy(content)
    target = float_accuracy - budget
    # Every layer kept out of int4 is the most the search can offer: when
    # even that misses the budget (the quickstart's pruned networks in int8),
    # no layer can go to int4 and ranking them would change nothing.
    everything_kept = (float_accuracy if kept_bits is None else
                       accuracy(with_rounded_weights(content, [], 4, ops, kept_bits)))
    hopeless = everything_kept < target
    if hopeless:
        ranked = ops
    else:
        scores = sensitivities(content, ops, images[:SENSITIVITY_IMAGES], threads)
        ranked = [ops[i] for i in np.argsort(scores)[::-1]]
    rounded_accuracy = {len(ranked): everything_kept}

    def rounded(k: int) -> float:  # the k most sensitive kept out of int4
        if k not in rounded_accuracy:
            rounded_accuracy[k] = accuracy(with_rounded_weights(content, ranked[k:], 4,
                                                                ranked[:k], kept_bits))
        return rounded_accuracy[k]

    low, high = (len(ranked) if hopeless else 0), len(ranked)
    while low < high:
        middle = (low + high) // 2
        if rounded(middle) >= target:
            high = middle
        else:
            low = middle + 1
    k = high
    while True:
        mixed = quantize(content, ranked[:k], kept_bits)
        reached = accuracy(mixed)
        if reached >= target or k >= len(ranked):
            break
        k = min(len(ranked), k + max(1, len(ranked) // 16))
    return MixedChoice(mixed, len(ranked), [op.scope for op in ranked[:k]], kept_bits,
                       float_accuracy, reached, rounded(0), budget)


def convert_mixed(float_content: bytes, images: np.ndarray, labels: np.ndarray, budget: float,
                  kept_bits: int | None = 8, threads: int = 1) -> MixedChoice:
    """`choose_mixed`, with the quantiser's failures as one ConversionError."""
    try:
        return choose_mixed(float_content, images, labels, budget, kept_bits, threads)
    except Exception as error:  # the quantizer raises many unrelated types
        first = first_line(error)
        raise tflite.ConversionError(f"mixed quantisation failed: {first}") from None

