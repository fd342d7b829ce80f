"""pycaffe's surface beyond Net, for `import caffeish as caffe` scripts.

io (`caffe.io`, also `caffeish.io`: file formats, Transformer, load_image,
blobproto/datum helpers) and transformer (pycaffe's Transformer, load_image,
resize_image, oversample).  `caffe.Net` is caffeish.runtime.net.Net, whose
pycaffe views live in caffeish.runtime.blobs.

Imports formats, graph and runtime.
"""
