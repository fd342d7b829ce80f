"""Tiny generated models and a store of them, for the model store tests (imported by test_store*.py).

The tests here check the generated models themselves: the FCN's Crop offset is
the one Caffe's coordinate arithmetic gives, and both nets run.
"""
import hashlib
import os
import shutil
import textwrap

import numpy as np

import caffeish
from caffeish.formats import io
from caffeish.apps.surgery_fcn import build_fcn
from caffeish.apps import offsets

CLASSIFIER = """\
name: "tiny_classifier"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

# An FCN in miniature: conv, pool /2, 1x1 score, bilinear 2x upsampling, Crop back to the input
# (offset 1, which `caffeish offsets --check` computes for this net).
FCN = """\
name: "tiny_fcn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "Convolution" bottom: "pool1" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "upscore" type: "Deconvolution" bottom: "score" top: "upscore"
  convolution_param { num_output: 3 group: 3 kernel_size: 4 stride: 2 bias_term: false
                      weight_filler { type: "bilinear" } } }
layer { name: "crop" type: "Crop" bottom: "upscore" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
"""


# The classifier that the store's FCN is built from with the surgery tool (pad 100, 1x1 score_fr,
# bilinear x2 upscore, Crop to the data).
POOLED_CLASSIFIER = """\
name: "tiny_pooled_classifier"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_model(folder, proto, seed, labels=None, mean_shape=None, readme=None, pad_bytes=0):
    """A model folder: deploy.prototxt, weights.caffemodel from the fillers, labels, mean, readme.

    `pad_bytes` makes the caffemodel bigger with an extra unused layer, so that
    a download takes several chunks.
    """
    os.makedirs(folder, exist_ok=True)
    deploy = os.path.join(folder, "deploy.prototxt")
    with open(deploy, "w") as f:
        f.write(proto)
    net = caffeish.Net(deploy, seed=seed)
    net.save(os.path.join(folder, "weights.caffemodel"))
    return _add_extras(folder, seed, labels, mean_shape, readme, pad_bytes)


def write_surgery_fcn(folder, seed, classes=3, **extras):
    """A model folder holding the FCN that `caffeish surgery fcn` builds from POOLED_CLASSIFIER."""
    source = write_model(os.path.join(folder, "classifier_source"), POOLED_CLASSIFIER, seed=seed)
    fcn = build_fcn(os.path.join(source, "deploy.prototxt"), os.path.join(source, "weights.caffemodel"),
                    classes=classes, seed=seed)
    shutil.rmtree(source)
    io.write_prototxt(os.path.join(folder, "deploy.prototxt"), fcn.deploy)
    io.write_caffemodel(os.path.join(folder, "weights.caffemodel"), fcn.deploy, fcn.blobs)
    return _add_extras(folder, seed, **extras)


def _add_extras(folder, seed, labels=None, mean_shape=None, readme=None, pad_bytes=0):
    weights = os.path.join(folder, "weights.caffemodel")
    if pad_bytes:
        model = io.read_caffemodel(weights)
        extra = model.net.layer.add()
        extra.name, extra.type = "unused_padding", "Parameter"
        rng = np.random.default_rng(seed)
        model.blobs.append([rng.standard_normal(pad_bytes // 4).astype(np.float32)])
        io.write_caffemodel(weights, model.net, model.blobs)
    if labels:
        with open(os.path.join(folder, "labels.txt"), "w") as f:
            f.write("\n".join(labels) + "\n")
    if mean_shape:
        io.write_binaryproto(os.path.join(folder, "mean.binaryproto"),
                             np.full(mean_shape, 100.0, np.float32))
    if readme is not None:
        with open(os.path.join(folder, "readme.md"), "w") as f:
            f.write(textwrap.dedent(readme).format(sha1=sha1(weights)))
    return folder


CLASSIFIER_README = """\
---
name: Tiny Classifier
caffemodel: weights.caffemodel
caffemodel_url: http://example.invalid/tiny.caffemodel
license: unrestricted
sha1: {sha1}
gist_id: 0123abcd
---

# Tiny classifier

A five-class classifier generated with fillers, for the store tests.
"""

FCN_README = """\
---
name: Tiny FCN
license: BSD-2-Clause
description: A miniature FCN with bilinear upsampling
---
"""


def make_store(root, pad_bytes=3 << 20):
    """A store with two models: 'classifier' (readme with sha1, labels) and 'fcn' (built by the surgery
    tool; mean, big weights)."""
    write_model(os.path.join(root, "classifier"), CLASSIFIER, seed=1,
                labels=["cat", "dog", "bird", "fish", "frog"], readme=CLASSIFIER_README)
    write_surgery_fcn(os.path.join(root, "fcn"), seed=2, mean_shape=(3, 16, 16), readme=FCN_README,
                      pad_bytes=pad_bytes)
    return root


def copy_store(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_generated_fcn_crop_offset_is_the_computed_one(tmp_path):
    folder = write_model(str(tmp_path / "fcn"), FCN, seed=2)
    net, _ = io.read_prototxt(os.path.join(folder, "deploy.prototxt"))
    assert tuple(offsets.crop_offsets(net)["crop"]) == (1, 1)


def test_generated_models_run(tmp_path):
    root = make_store(str(tmp_path), pad_bytes=4096)
    cls = caffeish.Net(os.path.join(root, "classifier", "deploy.prototxt"),
                       os.path.join(root, "classifier", "weights.caffemodel"), caffeish.TEST)
    prob = cls.forward(data=np.ones((1, 3, 8, 8), np.float32))["prob"]
    assert prob.shape == (1, 5) and abs(float(prob.sum()) - 1) < 1e-5
    fcn = caffeish.Net(os.path.join(root, "fcn", "deploy.prototxt"),
                       os.path.join(root, "fcn", "weights.caffemodel"), caffeish.TEST)
    assert [l.type for l in fcn.layers][-2:] == ["Deconvolution", "Crop"]
    assert fcn.forward(data=np.ones((1, 3, 16, 16), np.float32))["score"].shape == (1, 3, 16, 16)
    assert fcn.unused_weights == ["unused_padding"]
    net, _ = io.read_prototxt(os.path.join(root, "fcn", "deploy.prototxt"))
    crop = [l for l in net.layer if l.type == "Crop"][0]
    assert tuple(offsets.crop_offsets(net)[crop.name]) == tuple(crop.crop_param.offset) * 2
