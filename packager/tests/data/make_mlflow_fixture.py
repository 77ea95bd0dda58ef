"""Writes mlflow-iris/: a small scikit-learn MLP on iris, converted with
skl2onnx and logged with the real `mlflow` package (onnx flavor, a
column-based signature), its weights moved to an external-data file beside
model.onnx (what ONNX and MLflow write for large models), and
expected.json: onnxruntime's outputs for a few rows. Tests only read these
files.

    pip install mlflow-skinny pandas scikit-learn skl2onnx onnx onnxruntime
    python packager/tests/data/make_mlflow_fixture.py
"""
import json
import os
import shutil
import tempfile

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from sklearn.datasets import load_iris
from sklearn.neural_network import MLPClassifier
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
import mlflow  # noqa: E402
import mlflow.onnx  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "mlflow-iris")

X, y = load_iris(return_X_y=True, as_frame=True)
X.columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
X = X.astype(np.float32)
clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3000, random_state=0).fit(X.values, y)
onx = convert_sklearn(
    clf,
    initial_types=[("float_input", FloatTensorType([None, 4]))],
    options={id(clf): {"zipmap": False}},
    target_opset=15,
)
signature = infer_signature(X, clf.predict_proba(X.values).astype(np.float32))

with tempfile.TemporaryDirectory() as tmp:
    mlflow.set_tracking_uri("file:" + os.path.join(tmp, "mlruns"))
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onx, name="model", signature=signature)
    shutil.rmtree(OUT, ignore_errors=True)
    mlflow.artifacts.download_artifacts(info.model_uri, dst_path=OUT)

# Weights in an external-data file beside model.onnx.
path = os.path.join(OUT, "model.onnx")
model = onnx.load(path)
for t in model.graph.initializer:  # skl2onnx writes float_data; external data needs raw_data
    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
onnx.save_model(
    model,
    path,
    save_as_external_data=True,
    all_tensors_to_one_file=True,
    location="model.onnx.data",
    size_threshold=64,  # weights out, small shape tensors stay inline (as onnxruntime needs)
)
assert os.path.getsize(os.path.join(OUT, "model.onnx.data")) > 0

rows = X.values[[0, 60, 120]]
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
(probabilities,) = [o for o, d in zip(session.run(None, {"float_input": rows}), session.get_outputs()) if d.name == "probabilities"]
with open(os.path.join(HERE, "mlflow-iris.expected.json"), "w") as f:
    json.dump({"rows": rows.tolist(), "columns": list(X.columns), "probabilities": probabilities.tolist()}, f, indent=1)
print("wrote", OUT)
