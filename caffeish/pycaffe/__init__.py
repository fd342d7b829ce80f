"""pycaffe's surface beyond Net, for `import caffeish as caffe` scripts.

io (`caffe.io`, also `caffeish.io`: file formats, Transformer, load_image,
blobproto/datum helpers) and transformer (pycaffe's Transformer, load_image,
resize_image, oversample).  `caffe.Net` is caffeish.runtime.net.Net, whose
pycaffe views live in caffeish.runtime.blobs.

net_spec (`caffe.NetSpec`, `caffe.layers`, `caffe.params`, `caffe.to_proto`: nets
written in Python), coord_map (`caffe.coord_map`: coord_map_from_to and crop, on
caffeish.graph.geometry's coordinate maps) and draw (`caffe.draw`: pictures of a
net through pydot and Graphviz, the optional `caffeish[draw]` extra).

Imports formats, graph and runtime.
"""
