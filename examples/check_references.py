#!/usr/bin/env python3
"""Audits the committed golden references of the examples.

For every example project (a directory with a ferry.toml) this re-runs each golden request
through the Python reference of the standard guest (ferry_reference.py) and onnxruntime, and
asserts the committed expected response matches: same structure both ways, every number within
the golden's tolerance (the largest difference is printed). As an independent cross-check it
also evaluates each model in float64 with a small numpy interpreter (only the operators these
examples use) and asserts onnxruntime's float32 numbers are within tolerance of it. It also checks the models with
onnx.checker, the iris tensor-form request (`ferry pack --model` passthrough), and prints the
drift statistics of the drift test data.

    python3 examples/check_references.py            # exit status 1 on any mismatch
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ferry_reference as ref  # noqa: E402


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def eval_f64(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float64 evaluation of the operators used by the examples (independent of onnxruntime)."""
    env = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    env.update({k: v.astype(np.float64) for k, v in inputs.items()})
    for node in model.graph.node:
        a, x = _attrs(node), [env[n] for n in node.input if n]
        op = node.op_type
        if op == "LinearClassifier":
            labels = np.array(a["classlabels_ints"])
            coef = np.array(a["coefficients"], dtype=np.float64).reshape(len(a["intercepts"]), -1)
            scores = x[0] @ coef.T + np.array(a["intercepts"], dtype=np.float64)
            if a.get("post_transform", b"NONE") == b"SOFTMAX":
                e = np.exp(scores - scores.max(axis=1, keepdims=True))
                scores = e / e.sum(axis=1, keepdims=True)
            outs = [labels[scores.argmax(axis=1)], scores]
        elif op == "Normalizer":
            assert a["norm"] == b"L1"
            outs = [x[0] / np.abs(x[0]).sum(axis=1, keepdims=True)]
        elif op == "Conv":
            w, b = x[1], x[2]
            assert a.get("group", 1) == 1 and all(d == 1 for d in a.get("dilations", [1, 1]))
            assert all(s_ == 1 for s_ in a.get("strides", [1, 1]))
            pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
            xp = np.pad(x[0], ((0, 0), (0, 0), (pt, pb), (pl, pr)))
            kh, kw = w.shape[2:]
            oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
            y = np.zeros((xp.shape[0], w.shape[0], oh, ow))
            for i in range(kh):
                for j in range(kw):
                    y += np.einsum("nchw,oc->nohw", xp[:, :, i:i + oh, j:j + ow], w[:, :, i, j])
            outs = [y + b[None, :, None, None]]
        elif op == "Relu":
            outs = [np.maximum(x[0], 0.0)]
        elif op == "MaxPool":
            k = a["kernel_shape"]
            assert a.get("strides", k) == k and not any(a.get("pads", [0]))
            n, c, h, w_ = x[0].shape
            outs = [x[0][:, :, :h // k[0] * k[0], :w_ // k[1] * k[1]]
                    .reshape(n, c, h // k[0], k[0], w_ // k[1], k[1]).max(axis=(3, 5))]
        elif op == "Flatten":
            outs = [x[0].reshape(x[0].shape[0], -1)]
        elif op == "Gemm":
            mat_a = x[0].T if a.get("transA", 0) else x[0]
            mat_b = x[1].T if a.get("transB", 0) else x[1]
            outs = [a.get("alpha", 1.0) * mat_a @ mat_b + a.get("beta", 1.0) * x[2]]
        else:
            raise NotImplementedError(op)
        env.update(zip(node.output, outs))
    return {o.name: env[o.name] for o in model.graph.output}


def check_f64(name: str, model: onnx.ModelProto, sess, project: dict, request: Path, tol: float) -> bool:
    """onnxruntime's response vs the same response from a float64 evaluation of the model."""
    body = request.read_bytes()
    inputs = ref.preprocess(project, sess, body, ref.content_type_of(request))
    ort_out = ref.run_model(sess, inputs)
    f64_out = eval_f64(model, inputs)
    as_ort = {k: v.astype(ort_out[k].dtype) if not np.issubdtype(ort_out[k].dtype, np.floating) else v
              for k, v in f64_out.items()}
    expected = ref.postprocess(project, as_ort)
    actual = ref.postprocess(project, ort_out)
    errs = ref.compare(expected, actual, tol)
    raw = max(float(np.abs(ort_out[k].astype(np.float64) - f64_out[k]).max()) for k in ort_out)
    if errs:
        print(f"  FAIL {name} vs float64: " + "; ".join(errs[:5]))
        return False
    print(f"  ok   {name} vs float64 model (max |diff| of raw outputs {raw:.2e})")
    return True


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max((max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        return max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(a - b)
    return 0.0


def check_one(name: str, expected_path: Path, actual: dict, tol: float) -> bool:
    expected = json.loads(expected_path.read_text())
    errs = ref.compare(expected, actual, tol) + ref.compare(actual, expected, tol)
    if errs:
        print(f"  FAIL {name}: " + "; ".join(errs[:5]))
        return False
    print(f"  ok   {name} (max |diff| {max_diff(expected, actual):.2e}, tolerance {tol:g})")
    return True


def read_csv(path: Path, columns: list[str]) -> np.ndarray:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(r[c]) for c in columns] for r in rows])


def image_dir_features(path: Path) -> np.ndarray:
    return np.array([ref.image_features(ref.decode_image(p.read_bytes(), "grayscale"))
                     for p in sorted(path.glob("*.png"))])


def main() -> int:
    ok = True
    for project_dir in sorted(p.parent for p in HERE.glob("*/ferry.toml")):
        project = ref.load_project(project_dir)
        model_path = project_dir / project["model"]["path"]
        onnx.checker.check_model(onnx.load(str(model_path)), full_check=True)
        model = onnx.load(str(model_path))
        sess = ref.session(model_path)
        print(f"{project_dir.name}: {model_path.name} ({model_path.stat().st_size} bytes)")
        for i in sess.get_inputs():
            print(f"  input  {i.name} {i.type} {i.shape}")
        for o in sess.get_outputs():
            print(f"  output {o.name} {o.type} {o.shape}")
        for g in project.get("golden", []):
            actual = ref.respond(project, sess, project_dir / g["input"])
            tol = float(g.get("tolerance", 1e-5))
            ok &= check_one(g["name"], project_dir / g["expected"], actual, tol)
            ok &= check_f64(g["name"], model, sess, project, project_dir / g["input"], tol)
        tensor_req = project_dir / "golden" / "tensor_request.json"
        if tensor_req.exists():
            actual = ref.respond_raw(sess, tensor_req)
            ok &= check_one("tensor_request (--model)", project_dir / "golden" / "tensor_request.expected.json",
                            actual, 1e-5)
            ok &= check_f64("tensor_request (--model)", model, sess, {}, tensor_req, 1e-5)

        # Drift test data.
        baseline = project_dir / project["drift"]["baseline"]
        if baseline.is_dir():
            names = ["brightness", "contrast"]
            base = image_dir_features(baseline)
            currents = {c: image_dir_features(project_dir / "data" / c) for c in ("current_same", "current_shifted")}
        else:
            names = [f["name"] for f in project["preprocess"]["features"]]
            base = read_csv(baseline, names)
            currents = {c: read_csv(project_dir / "data" / f"{c}.csv", names)
                        for c in ("current_same", "current_shifted")}
        print(f"  drift vs {project['drift']['baseline']} ({len(base)} rows); KS p, Wasserstein / baseline std:")
        for c, cur in currents.items():
            for j, n in enumerate(names):
                s = ref.drift_stats(base[:, j], cur[:, j])
                print(f"    {c:16s} ({len(cur)}) {n:13s} p={s['ks_p']:<10.4g} W_normed={s['wasserstein_normed']:.4f}")
    print("all references match" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
