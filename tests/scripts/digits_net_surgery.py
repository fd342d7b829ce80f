"""The DIGITS semantic-segmentation "net surgery" flow, written as for BVLC pycaffe, run with `import caffeish as caffe`.

Usage: digits_net_surgery.py CLASSIFIER.prototxt CLASSIFIER.caffemodel FCN.prototxt OUT.caffemodel

DIGITS' examples/semantic-segmentation/net_surgery.py loads AlexNet with its
weights, loads the hand-written FCN-Alexnet prototxt without weights, copies
every parameter blob of a layer name found in both nets (the fully connected
weights land in the equivalent convolutions: same values, another shape),
drops the others, and saves the FCN's weights.  This script does the same
through pycaffe's surface (net.params[...][i].data, net.save), checking each
element count first, and prints a JSON log of what it did.
"""
import json
import sys

import caffeish as caffe

classifier_def, classifier_weights, fcn_def, out_path = sys.argv[1:5]

caffe.set_mode_cpu()
classifier = caffe.Net(classifier_def, classifier_weights, caffe.TEST)
fcn = caffe.Net(fcn_def, caffe.TEST)

log = []
for name in classifier.params:
    if name not in fcn.params:
        log.append(["dropping", name])
        continue
    for i, source in enumerate(classifier.params[name]):
        if i >= len(fcn.params[name]):
            log.append(["dropping", name, i])
            break
        target = fcn.params[name][i]
        if source.data.size != target.data.size:
            raise SystemExit(f"{name}[{i}]: {source.data.shape} does not fit {target.data.shape}")
        verb = "copying" if source.data.shape == target.data.shape else "coercing"
        log.append([verb, name, i, list(source.data.shape), list(target.data.shape)])
        target.data[...] = source.data.reshape(target.data.shape)

fcn.save(out_path)
print(json.dumps({"log": log, "fcn_params": {n: [list(p.data.shape) for p in ps] for n, ps in fcn.params.items()}}))
