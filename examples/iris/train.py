#!/usr/bin/env python3
"""Trains and exports the iris example, and regenerates every data and golden file.

    python3 examples/iris/train.py

Deterministic: fixed split and sampling seeds; lbfgs is deterministic. Writes, relative to
this directory: model.onnx, ferry.toml, data/*.csv, golden/*.json.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import ferry_reference as ref  # noqa: E402

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]
SPLIT_SEED = 42          # train/test split
TEST_SIZE = 0.3
BASELINE_SEED = 1        # synthetic baseline sample
CURRENT_SEED = 2         # synthetic "current" sample
N_BASELINE = 2000
N_CURRENT = 1000
PETAL_LENGTH_SHIFT = 1.5  # cm, added in current_shifted.csv
PETAL_WIDTH_SCALE = 1.6   # factor, applied in current_shifted.csv
TOLERANCE = 1e-5


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Exactly what the guest computes: (f32(x) - f32(mean)) / f32(std), in float32."""
    return (x.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32)


def write_csv(path: Path, rows: np.ndarray, extra: dict[str, list] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(FEATURES + list(extra))
        for i, r in enumerate(rows):
            w.writerow([f"{v:.2f}" for v in r] + [extra[k][i] for k in extra])


def synthetic(train_x: np.ndarray, train_y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n rows from a per-class Gaussian mixture fitted on the training split (class weights =
    training class frequencies), clipped at 0.1 cm and rounded to 0.01 cm."""
    rng = np.random.default_rng(seed)
    weights = np.bincount(train_y, minlength=3) / len(train_y)
    classes = rng.choice(3, size=n, p=weights)
    out = np.empty((n, 4))
    for c in range(3):
        xc = train_x[train_y == c]
        mu, cov = xc.mean(axis=0), np.cov(xc, rowvar=False)
        idx = np.flatnonzero(classes == c)
        out[idx] = rng.multivariate_normal(mu, cov, size=len(idx), method="cholesky")
    return np.round(np.clip(out, 0.1, None), 2)


def main() -> None:
    iris = load_iris()
    x, y = iris.data, iris.target
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)

    # Standardisation: mean and *population* std (ddof=0, like sklearn's StandardScaler) of the
    # training split, rounded to 6 decimals; the rounded numbers are what ferry.toml holds and
    # what the model was trained on.
    mean = np.round(x_tr.mean(axis=0), 6)
    std = np.round(x_tr.std(axis=0, ddof=0), 6)

    z_tr = standardize(x_tr, mean, std)
    z_te = standardize(x_te, mean, std)
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0)
    clf.fit(z_tr.astype(np.float64), y_tr)
    train_acc = float(clf.score(z_tr, y_tr))
    test_acc = float(clf.score(z_te, y_te))

    onx = convert_sklearn(
        clf,
        initial_types=[("float_input", FloatTensorType([None, 4]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.doc_string = "Iris LogisticRegression on standardized features (Ferry example)"
    onx.graph.name = "iris_logistic_regression"  # skl2onnx names the graph with a random UUID
    onnx.checker.check_model(onx)
    model_path = HERE / "model.onnx"
    model_path.write_bytes(onx.SerializeToString())

    sess = ref.session(model_path)
    ort_out = ref.run_model(sess, {"float_input": z_te})
    ort_acc = float((ort_out["label"] == y_te).mean())
    print(f"iris: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} (onnxruntime {ort_acc:.4f})")
    print(f"iris: mean {mean.tolist()}  std (population) {std.tolist()}")

    # ---------------------------------------------------------------- data
    data = HERE / "data"
    names = [CLASSES[i] for i in range(3)]
    write_csv(data / "iris_train.csv", x_tr, {"species": [names[i] for i in y_tr]})
    write_csv(data / "iris_test.csv", x_te, {"species": [names[i] for i in y_te]})
    baseline = synthetic(x_tr, y_tr, N_BASELINE, BASELINE_SEED)
    current = synthetic(x_tr, y_tr, N_CURRENT, CURRENT_SEED)
    shifted = current.copy()
    shifted[:, 2] = np.round(shifted[:, 2] + PETAL_LENGTH_SHIFT, 2)
    shifted[:, 3] = np.round(shifted[:, 3] * PETAL_WIDTH_SCALE, 2)
    write_csv(data / "baseline.csv", baseline)
    write_csv(data / "current_same.csv", current)
    write_csv(data / "current_shifted.csv", shifted)

    print("iris drift check (KS p-value, Wasserstein / baseline population std):")
    ok = True
    for label, cur, drifted in (("current_same", current, set()),
                                ("current_shifted", shifted, {"petal_length", "petal_width"})):
        for j, f in enumerate(FEATURES):
            s = ref.drift_stats(baseline[:, j], cur[:, j])
            print(f"  {label:16s} {f:13s} KS p={s['ks_p']:.4g}  W_normed={s['wasserstein_normed']:.4f}")
            if f in drifted:
                ok &= s["wasserstein_normed"] >= 0.1 and s["ks_p"] < 0.05
            else:
                ok &= s["wasserstein_normed"] < 0.1 and s["ks_p"] > 0.05
    if not ok:
        raise SystemExit("drift data does not meet its expectations; change the seeds")

    # ---------------------------------------------------------------- ferry.toml
    feat_lines = ",\n".join(
        f'  {{ name = "{f}", mean = {float(m)!r}, std = {float(s)!r} }}' for f, m, s in zip(FEATURES, mean, std)
    )
    goldens = ["setosa", "versicolor", "virginica", "batch"]
    golden_toml = "\n".join(
        f'[[golden]]\nname = "{g}"\ninput = "golden/{g}.json"\nexpected = "golden/{g}.expected.json"\n'
        f"tolerance = {TOLERANCE}\n"
        for g in goldens
    )
    toml = f"""# Ferry example: iris, a multinomial logistic regression on standardized features.
# Generated by train.py; see README.md.

[model]
name = "iris"
version = "1.0.0"
path = "model.onnx"
description = "Iris species from sepal/petal measurements (cm): LogisticRegression, scikit-learn {sklearn.__version__}"

[release]
fleet = "demo"
channel = "stable"
sequence = 1

[preprocess]
kind = "tabular"
input = "float_input"
# mean / std: training split, population std (ddof = 0); the guest computes (x - mean) / std.
features = [
{feat_lines},
]

[postprocess]
kind = "classification"
output = "probabilities"
labels = ["setosa", "versicolor", "virginica"]
top_k = 3

[drift]
baseline = "data/baseline.csv"

{golden_toml}
[lineage]
dataset = "data/baseline.csv"

[lineage.training]
algorithm = "LogisticRegression"
solver = "lbfgs"
multi_class = "multinomial"
C = 1.0
library = "scikit-learn"
sklearn_version = "{sklearn.__version__}"
skl2onnx_version = "{skl2onnx.__version__}"
standardization = "training-split mean and population std (ddof=0), applied by the guest"
train_rows = {len(y_tr)}
test_rows = {len(y_te)}
split_seed = {SPLIT_SEED}
train_accuracy = {round(train_acc, 4)}
test_accuracy = {round(test_acc, 4)}
"""
    (HERE / "ferry.toml").write_text(toml)
    project = ref.load_project(HERE)

    # ---------------------------------------------------------------- golden
    gdir = HERE / "golden"
    gdir.mkdir(exist_ok=True)

    def record(row: np.ndarray) -> dict:
        return {f: float(v) for f, v in zip(FEATURES, row)}

    pred_te = ort_out["label"]
    for c, name in enumerate(CLASSES):
        i = next(i for i in range(len(y_te)) if y_te[i] == c and pred_te[i] == c)
        ref.write_json(gdir / f"{name}.json", {"records": [record(x_te[i])]})
    ref.write_json(gdir / "batch.json", {"records": [record(r) for r in x_te[:5]]})
    for g in goldens:
        resp = ref.respond(project, sess, gdir / f"{g}.json")
        ref.write_json(gdir / f"{g}.expected.json", resp)
        print(f"  golden {g}: {[p['label'] for p in resp['predictions']]}")

    # Tensor form for `ferry pack --model model.onnx` (passthrough guest, tensor response).
    t = z_te[:2]
    ref.write_json(gdir / "tensor_request.json",
                   {"inputs": {"float_input": {"shape": [2, 4], "data": [float(v) for v in t.reshape(-1)]}}})
    ref.write_json(gdir / "tensor_request.expected.json", ref.respond_raw(sess, gdir / "tensor_request.json"))

    info = {
        "inputs": [(i.name, i.type, i.shape) for i in sess.get_inputs()],
        "outputs": [(o.name, o.type, o.shape) for o in sess.get_outputs()],
        "ops": sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onx.graph.node}),
        "opsets": {o.domain or "ai.onnx": o.version for o in onx.opset_import},
        "bytes": model_path.stat().st_size,
    }
    print("iris model:", json.dumps(info))


if __name__ == "__main__":
    main()
