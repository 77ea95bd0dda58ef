#!/usr/bin/env python3
"""Small ONNX models that one engine refuses and the other runs, for the
engine tests (runtime/tests/engines.rs, packager/tests/engines.rs). Built with
the `onnx` package alone (numpy + onnx), committed under
runtime/tests/fixtures/:

- sequence_concat.onnx: x [N, 4] -> SequenceConstruct(x, 2x) ->
  ConcatFromSequence(axis=1) -> y [N, 8]. tract implements no sequence
  operator; onnxruntime runs it. y = [x, 2x].
- expand_shape.onnx: x [N, 4], shape [K] (int64) -> Expand(x, shape) -> y.
  The shape input has a variable length, so the output's rank is not known:
  tract refuses it; onnxruntime runs it.
- prelu_slopes.onnx: x [N, 3, 4] -> PRelu with a 3x4 slope tensor -> y.
  y = x where x >= 0, slope * x elsewhere, slope[c, j] = 0.1 * (c + 1) + 0.01 * j.
  Issue 12 lists multi-dimensional slopes among tract's refusals; tract
  0.23.9 runs them (and this model) like onnxruntime, so it is in the
  engines' agreement test instead.
- opset6_relu.onnx: x [N, 4] -> Relu -> y, opset 6. onnxruntime refuses
  opsets below 7; tract runs it.
- gru.onnx: x [N, 5, 3] -> Transpose -> GRU (hidden 4, seeded weights) ->
  y [1, N, 4], the last hidden state. A recurrent model: tract keeps the
  GRU's hidden state in a run state, which must not leak from one request
  into the next (runtime/tests/model.rs).

    python3 scripts/engine_fixtures.py runtime/tests/fixtures
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model, path, check=True):
    model.ir_version = 7 if model.opset_import[0].version >= 7 else 3
    # The checker wants every value's shape; Expand's output has no rank.
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, path)
    print(f"wrote {path}")


def sequence_concat():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("SequenceConstruct", ["x", "x2"], ["seq"]),
        helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=1),
    ]
    graph = helper.make_graph(nodes, "sequence_concat", [x], [y], [two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def expand_shape():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, ["K"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "expand_shape", [x, shape], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def prelu_slopes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])
    c = np.arange(3, dtype=np.float32).reshape(3, 1)
    j = np.arange(4, dtype=np.float32).reshape(1, 4)
    slope = (0.1 * (c + 1) + 0.01 * j).astype(np.float32)
    nodes = [helper.make_node("PRelu", ["x", "slope"], ["y"])]
    graph = helper.make_graph(
        nodes, "prelu_slopes", [x], [y], [numpy_helper.from_array(slope, "slope")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def opset6_relu():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "opset6_relu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])


def gru():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "N", 4])
    rng = np.random.default_rng(12)
    w = rng.uniform(-0.5, 0.5, (1, 12, 3)).astype(np.float32)
    r = rng.uniform(-0.5, 0.5, (1, 12, 4)).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, (1, 24)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["xt", "W", "R", "B"], ["", "y"], hidden_size=4),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    graph = helper.make_graph(nodes, "gru", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runtime/tests/fixtures")
    out.mkdir(parents=True, exist_ok=True)
    save(sequence_concat(), out / "sequence_concat.onnx")
    save(expand_shape(), out / "expand_shape.onnx", check=False)
    save(prelu_slopes(), out / "prelu_slopes.onnx")
    save(opset6_relu(), out / "opset6_relu.onnx")
    save(gru(), out / "gru.onnx")


if __name__ == "__main__":
    main()
