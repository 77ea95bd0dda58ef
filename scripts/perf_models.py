#!/usr/bin/env python3
"""Models for the engine benchmarks (docs/PERFORMANCE.md), built with the
`onnx` package alone (numpy + onnx; no torch needed) and random weights:

- mlp.onnx (with --fixtures): a multi-layer perceptron on 4 features (4 -> 32 -> 32 -> 3,
  ReLU, softmax), the shape of a scikit-learn MLPClassifier export.
- mobilenet_v3_small.onnx: torchvision's mobilenet_v3_small architecture
  (batch norm folded into the convolutions, as `torch.onnx.export` does in
  eval mode), 3x224x224 input, 1000 classes, ~10 MB. Not committed: run this
  script to make it (the benchmarks look for it in $FERRY_BENCH_MODELS,
  default /tmp/ferry-bench-models, and skip it with a message when absent).
- with --fixtures, the runtime's committed test fixtures
  (runtime/tests/fixtures/): digits_batch1.onnx, examples/digits/model.onnx
  with its batch dimension fixed to 1 (a model without a symbolic batch), and
  mlp.onnx.

Every model takes input `input` with batch dimension `N` (except the
fixture) and opset 17.

    python3 scripts/perf_models.py OUT_DIR
    python3 scripts/perf_models.py --fixtures runtime/tests/fixtures
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Graph:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.n = 0

    def name(self, kind):
        self.n += 1
        return f"{kind}_{self.n}"

    def weight(self, shape, fan_in):
        name = self.name("w")
        w = (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(self, n):
        name = self.name("b")
        b = (self.rng.standard_normal(n) * 0.01).astype(np.float32)
        self.inits.append(numpy_helper.from_array(b, name))
        return name

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, groups=1):
        w = self.weight((cout, cin // groups, k, k), cin // groups * k * k)
        p = (k - 1) // 2
        return self.op(
            "Conv",
            [x, w, self.bias(cout)],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p, p, p, p],
            group=groups,
        )

    def act(self, x, kind):
        if kind == "RE":
            return self.op("Relu", [x])
        if kind == "HS":
            return self.op("HardSwish", [x])
        return x

    def model(self, inputs, output, out_shape):
        graph = helper.make_graph(
            self.nodes,
            "g",
            inputs,
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        # Rename the last value to the output's public name.
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        return m


def make_divisible(v, d=8):
    new_v = max(d, int(v + d / 2) // d * d)
    if new_v < 0.9 * v:
        new_v += d
    return new_v


def mobilenet_v3_small():
    g = Graph(0)
    x = g.act(g.conv("input", 3, 16, 3, 2), "HS")
    # torchvision's inverted_residual_setting for "small":
    # (input, kernel, expanded, output, squeeze-excite, activation, stride)
    setting = [
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ]
    for cin, k, exp, cout, se, act, stride in setting:
        y = x
        if exp != cin:
            y = g.act(g.conv(y, cin, exp, 1), act)
        y = g.act(g.conv(y, exp, exp, k, stride, groups=exp), act)
        if se:
            sq = make_divisible(exp // 4)
            s = g.op("GlobalAveragePool", [y])
            s = g.op("Relu", [g.conv(s, exp, sq, 1)])
            s = g.op("HardSigmoid", [g.conv(s, sq, exp, 1)], alpha=1.0 / 6, beta=0.5)
            y = g.op("Mul", [y, s])
        y = g.conv(y, exp, cout, 1)
        if stride == 1 and cin == cout:
            y = g.op("Add", [y, x])
        x = y
    x = g.act(g.conv(x, 96, 576, 1), "HS")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    x = g.act(g.op("Gemm", [x, g.weight((1024, 576), 576), g.bias(1024)], transB=1), "HS")
    g.nodes.append(
        helper.make_node(
            "Gemm", [x, g.weight((1000, 1024), 1024), g.bias(1000)], ["logits"], transB=1
        )
    )
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])
    return g.model([inp], "logits", ["N", 1000])


def mlp():
    g = Graph(1)
    x = "input"
    for cin, cout in [(4, 32), (32, 32)]:
        x = g.op("Relu", [g.op("Add", [g.op("MatMul", [x, g.weight((cin, cout), cin)]), g.bias(cout)])])
    x = g.op("Add", [g.op("MatMul", [x, g.weight((32, 3), 32)]), g.bias(3)])
    g.nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])
    return g.model([inp], "probabilities", ["N", 3])


def digits_batch1(examples):
    m = onnx.load(examples / "digits" / "model.onnx")
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    return m


def main():
    args = sys.argv[1:]
    if args[:1] == ["--fixtures"]:
        out = Path(args[1])
        out.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parent.parent
        m = digits_batch1(root / "examples")
        onnx.checker.check_model(m)
        onnx.save(m, out / "digits_batch1.onnx")
        onnx.save(mlp(), out / "mlp.onnx")
        return
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, m in [("mobilenet_v3_small", mobilenet_v3_small())]:
        onnx.checker.check_model(m)
        onnx.save(m, out / f"{name}.onnx")
        print(out / f"{name}.onnx")


if __name__ == "__main__":
    main()
