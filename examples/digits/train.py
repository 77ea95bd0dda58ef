#!/usr/bin/env python3
"""Trains and exports the digits example (a small CNN on 8x8 grayscale PNGs), and regenerates
every data, golden and sample file.

    python3 examples/digits/train.py

Data: scikit-learn's bundled `load_digits` (values 0..16), turned into 8-bit grayscale PNGs with
p = round(v * 255 / 16) (half up). The network is trained on exactly what Ferry's image guest
produces from those PNGs: x = f32(p) * f32(1/255), NCHW [N, 1, 8, 8].

Deterministic: fixed seeds, one CPU thread, torch deterministic algorithms.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import sklearn
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import ferry_reference as ref  # noqa: E402

SPLIT_SEED = 42
TEST_SIZE = 0.25
TORCH_SEED = 0
EPOCHS = 40
BATCH = 32
LR = 3e-3
LABEL_SMOOTHING = 0.1    # keeps logits small (|logit| < ~10) so f32 round-off stays far below 1e-5
N_BASELINE = 300          # training-split images in data/baseline/
N_CURRENT = 100           # test-split images in data/current_same/ and data/current_shifted/
BRIGHTEN = 60             # data/current_shifted: p' = min(255, p + 60)
TOLERANCE = 1e-5
OPSET = 17


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


def to_pixels(v: np.ndarray) -> np.ndarray:
    """sklearn digits values (0..16) -> 8-bit pixels, p = round(v * 255 / 16), halves up."""
    return np.floor(v * 255.0 / 16.0 + 0.5).astype(np.uint8)


def png_bytes(p: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(p, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def guest_tensor(p: np.ndarray) -> np.ndarray:
    """[N, 8, 8] uint8 -> [N, 1, 8, 8] float32, as the guest computes it (scale 1/255, mean 0, std 1)."""
    return ((p.astype(np.float32) * np.float32(1.0 / 255.0) - np.float32(0.0)) / np.float32(1.0))[:, None, :, :]


def write_pngs(directory: Path, pixels: np.ndarray, names: list[str]) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for p, name in zip(pixels, names):
        (directory / name).write_bytes(png_bytes(p))


def main() -> None:
    torch.manual_seed(TORCH_SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    digits = load_digits()
    pixels = to_pixels(digits.images)  # [1797, 8, 8] uint8
    y = digits.target
    idx = np.arange(len(y))
    i_tr, i_te = train_test_split(idx, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    p_tr, p_te, y_tr, y_te = pixels[i_tr], pixels[i_te], y[i_tr], y[i_te]
    set_te = set(int(i) for i in i_te)

    # The PNG round trip must be lossless, so that training data == what the guest sees.
    for p in pixels[:50]:
        assert np.array_equal(ref.decode_image(png_bytes(p), "grayscale")[:, :, 0], p)

    x_tr = torch.from_numpy(guest_tensor(p_tr))
    x_te = torch.from_numpy(guest_tensor(p_te))
    t_tr = torch.from_numpy(y_tr.astype(np.int64))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    gen = torch.Generator().manual_seed(TORCH_SEED)
    for epoch in range(EPOCHS):
        net.train()
        perm = torch.randperm(len(t_tr), generator=gen)
        for k in range(0, len(perm), BATCH):
            b = perm[k:k + BATCH]
            opt.zero_grad()
            loss = loss_fn(net(x_tr[b]), t_tr[b])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        train_acc = float((net(x_tr).argmax(1).numpy() == y_tr).mean())
        test_acc = float((net(x_te).argmax(1).numpy() == y_te).mean())

    buf = io.BytesIO()
    torch.onnx.export(
        net, torch.zeros(1, 1, 8, 8), buf,
        dynamo=False, opset_version=OPSET, do_constant_folding=True,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    model = onnx.load_from_string(buf.getvalue())
    model.graph.name = "digits_cnn"
    model.doc_string = "8x8 grayscale digit classifier (Ferry example); input = pixel/255, NCHW"
    onnx.checker.check_model(model, full_check=True)
    model_path = HERE / "model.onnx"
    model_path.write_bytes(model.SerializeToString())

    sess = ref.session(model_path)
    logits_te = ref.run_model(sess, {"input": x_te.numpy()})["logits"]
    ort_acc = float((logits_te.argmax(1) == y_te).mean())
    print(f"digits: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} (onnxruntime {ort_acc:.4f})")
    if test_acc <= 0.95:
        raise SystemExit("test accuracy too low")

    # ---------------------------------------------------------------- data
    data = HERE / "data"
    write_pngs(data / "baseline", p_tr[:N_BASELINE], [f"train_{i:04d}.png" for i in i_tr[:N_BASELINE]])
    cur = p_te[:N_CURRENT]
    shifted = np.minimum(255, cur.astype(np.int32) + BRIGHTEN).astype(np.uint8)
    names = [f"test_{i:04d}.png" for i in i_te[:N_CURRENT]]
    write_pngs(data / "current_same", cur, names)
    write_pngs(data / "current_shifted", shifted, names)

    # The split itself (sklearn's load_digits ships with scikit-learn): the dataset digest.
    with open(data / "split.csv", "w") as f:
        f.write("index,split,label\n")
        for i in sorted(idx):
            f.write(f"{i},{'test' if i in set_te else 'train'},{y[i]}\n")

    def feats(ps: np.ndarray) -> np.ndarray:
        return np.array([ref.image_features(p) for p in ps])

    fb, fc, fs = feats(p_tr[:N_BASELINE]), feats(cur), feats(shifted)
    print("digits drift check (KS p-value, Wasserstein / baseline population std):")
    for label, f in (("current_same", fc), ("current_shifted", fs)):
        for j, name in enumerate(["brightness", "contrast"]):
            s = ref.drift_stats(fb[:, j], f[:, j])
            print(f"  {label:16s} {name:10s} KS p={s['ks_p']:.4g}  W_normed={s['wasserstein_normed']:.4f}")

    # ---------------------------------------------------------------- ferry.toml
    golden_names: list[str] = []
    pred_te = logits_te.argmax(1)
    chosen: list[int] = []
    for digit in (0, 3, 7):
        i = next(i for i in range(N_CURRENT, len(y_te)) if y_te[i] == digit and pred_te[i] == digit)
        chosen.append(i)
        golden_names.append(f"digit_{digit}")
    golden_toml = "\n".join(
        f'[[golden]]\nname = "{g}"\ninput = "golden/{g}.png"\nexpected = "golden/{g}.expected.json"\n'
        f"tolerance = {TOLERANCE}\n"
        for g in golden_names
    ) + f'\n[[golden]]\nname = "batch"\ninput = "golden/batch.json"\nexpected = "golden/batch.expected.json"\ntolerance = {TOLERANCE}\n'

    toml = f"""# Ferry example: digits, a small CNN on 8x8 grayscale PNGs.
# Generated by train.py; see README.md.

[model]
name = "digits"
version = "1.0.0"
path = "model.onnx"
description = "Handwritten digit (0-9) from an 8x8 grayscale image: small CNN, PyTorch {torch.__version__.split('+')[0]}"

[release]
fleet = "demo"
channel = "stable"
sequence = 1

[preprocess]
kind = "image"
input = "input"
width = 8
height = 8
color = "grayscale"
layout = "nchw"
# scale (1/255), mean [0] and std [1] are the defaults: the model takes pixel / 255.

[postprocess]
kind = "classification"
output = "logits"
activation = "softmax"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
top_k = 3

[drift]
baseline = "data/baseline"

{golden_toml}
[lineage]
dataset = "data/split.csv"

[lineage.training]
algorithm = "CNN: Conv(1->8,3x3,pad 1)-ReLU-Conv(8->16,3x3,pad 1)-ReLU-MaxPool(2)-Flatten-Linear(256->10)"
library = "PyTorch"
torch_version = "{torch.__version__}"
sklearn_version = "{sklearn.__version__}"
data = "sklearn load_digits, pixels round(v * 255 / 16)"
optimizer = "Adam"
learning_rate = {LR}
label_smoothing = {LABEL_SMOOTHING}
loss = "cross entropy"
epochs = {EPOCHS}
batch_size = {BATCH}
seed = {TORCH_SEED}
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
    if gdir.exists():
        shutil.rmtree(gdir)
    gdir.mkdir()
    for g, i in zip(golden_names, chosen):
        (gdir / f"{g}.png").write_bytes(png_bytes(p_te[i]))
    batch_idx = [next(i for i in range(N_CURRENT, len(y_te)) if y_te[i] == digit and i not in chosen)
                 for digit in (2, 8)]
    ref.write_json(gdir / "batch.json",
                   {"images": [base64.b64encode(png_bytes(p_te[i])).decode() for i in batch_idx]})
    for g in golden_names:
        resp = ref.respond(project, sess, gdir / f"{g}.png")
        ref.write_json(gdir / f"{g}.expected.json", resp)
        print(f"  golden {g}: {[(p['label'], round(p['score'], 4)) for p in resp['predictions']]}")
    resp = ref.respond(project, sess, gdir / "batch.json")
    ref.write_json(gdir / "batch.expected.json", resp)
    print(f"  golden batch: {[(p['label'], round(p['score'], 4)) for p in resp['predictions']]}"
          f" (true {[int(y_te[i]) for i in batch_idx]})")

    # ---------------------------------------------------------------- samples
    sdir = HERE / "samples"
    if sdir.exists():
        shutil.rmtree(sdir)
    sdir.mkdir()
    used = set(chosen) | set(batch_idx)
    sample_idx: list[int] = []
    for i in range(N_CURRENT, len(y_te)):  # six test images of six different digits
        if i not in used and y_te[i] not in {y_te[j] for j in sample_idx} and len(sample_idx) < 6:
            sample_idx.append(i)
    for i in sample_idx:
        (sdir / f"digit_{y_te[i]}_{i_te[i]:04d}.png").write_bytes(png_bytes(p_te[i]))
    first = sample_idx[0]
    ref.write_json(sdir / "sample.json", {"image": base64.b64encode(png_bytes(p_te[first])).decode()})
    print(f"  samples: {[int(y_te[i]) for i in sample_idx]}; sample.json is a {y_te[first]}")

    info = {
        "inputs": [(i.name, i.type, i.shape) for i in sess.get_inputs()],
        "outputs": [(o.name, o.type, o.shape) for o in sess.get_outputs()],
        "ops": [n.op_type for n in model.graph.node],
        "opset": [o.version for o in model.opset_import],
        "bytes": model_path.stat().st_size,
    }
    print("digits model:", json.dumps(info))


if __name__ == "__main__":
    main()
