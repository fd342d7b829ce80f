"""A pycaffe script runs unchanged with `import caffeish as caffe` and gives Caffe's numbers."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT, shared_path

SCRIPT = os.path.join(ROOT, "tests", "scripts", "pycaffe_classify_and_surgery.py")


def test_pycaffe_script_classifies_and_does_surgery(tmp_path):
    folder = shared_path("golden", "lenet_real_weights")
    inputs = np.load(os.path.join(folder, "inputs.npz"))["data"]
    expected = np.load(os.path.join(folder, "blobs.npz"))["prob"]
    images = []
    for i, plane in enumerate(inputs[:, 0]):
        path = tmp_path / f"digit{i}.png"
        # The golden digits are 0/1 images: exact in 8 bits, so load_image gives them back.
        Image.fromarray((plane * 255).round().astype(np.uint8), mode="L").save(path)
        images.append(str(path))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, SCRIPT, os.path.join(folder, "net.prototxt"), os.path.join(folder, "weights.caffemodel"),
         *images, "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    probs = np.array(report["probs"], dtype=np.float32)
    assert probs.shape == expected.shape
    assert np.max(np.abs(probs - expected)) / np.max(np.abs(expected)) <= 1e-5
    assert report["labels"] == expected.argmax(axis=1).tolist()
    assert report["inputs"] == ["data"] and report["outputs"] == ["prob"]
    assert report["layer_types"][:2] == ["Input", "Convolution"]
    assert report["blob_shapes"]["data"] == [4, 1, 28, 28]
    assert report["param_shapes"]["conv1"] == [[20, 1, 5, 5], [20]]
    assert report["top_names"]["conv1"] == ["conv1"] and report["bottom_names"]["conv1"] == ["data"]
    np.testing.assert_allclose(report["surgery_probs"], np.full((4, 10), 0.1), rtol=1e-6)
    assert report["conv1_equal"] is True
