"""A pycaffe-style script, written as for BVLC pycaffe, run with `import caffeish as caffe`.

Usage: pycaffe_classify_and_surgery.py MODEL_DEF WEIGHTS IMAGE... --out DIR

It classifies grayscale digit images with LeNet the way the pycaffe
tutorials do (Transformer, blobs[...].reshape, forward), then does "net
surgery" the way the FCN/DIGITS scripts do (edit net.params in place, save,
load into a second net with copy_from) and prints what it found as JSON.
"""
import json
import sys

import numpy as np

import caffeish as caffe

args = sys.argv[1:]
out_dir = args[args.index("--out") + 1]
model_def, model_weights, images = args[0], args[1], args[2:args.index("--out")]

caffe.set_mode_cpu()
net = caffe.Net(model_def, model_weights, caffe.TEST)

transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
transformer.set_transpose("data", (2, 0, 1))  # HxWxC -> CxHxW

net.blobs["data"].reshape(len(images), 1, 28, 28)
for i, path in enumerate(images):
    image = caffe.io.load_image(path, color=False)
    net.blobs["data"].data[i] = transformer.preprocess("data", image)
output = net.forward()
probs = output["prob"].copy()

report = {
    "inputs": net.inputs,
    "outputs": net.outputs,
    "layer_types": [layer.type for layer in net.layers],
    "layer_names": list(net._layer_names),
    "blob_shapes": {name: list(blob.data.shape) for name, blob in net.blobs.items() if name in ("data", "prob")},
    "param_shapes": {name: [list(p.data.shape) for p in params] for name, params in net.params.items()},
    "top_names": dict(net.top_names),
    "bottom_names": dict(net.bottom_names),
    "probs": probs.tolist(),
    "labels": probs.argmax(axis=1).tolist(),
}

# Net surgery: silence the classifier so every class is equally likely, save, reload.
net.params["ip2"][0].data[...] = 0
net.params["ip2"][1].data[...] = 0
net.save(out_dir + "/surgery.caffemodel")
net2 = caffe.Net(model_def, caffe.TEST)
net2.copy_from(out_dir + "/surgery.caffemodel")
net2.blobs["data"].reshape(*net.blobs["data"].data.shape)
net2.blobs["data"].data[...] = net.blobs["data"].data
report["surgery_probs"] = net2.forward()["prob"].tolist()
report["conv1_equal"] = bool(np.array_equal(net2.params["conv1"][0].data, net.params["conv1"][0].data))
print(json.dumps(report))
