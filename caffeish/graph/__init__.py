"""Graph: a net's structure, before anything is allocated (Caffe's Net::Init).

graph (NetStateRule filtering, Split insertion, in-place rules, shape
inference: `Graph`), geometry (the one place for conv/deconv/pool/crop
arithmetic and coordinate maps), registry (the `Layer` base class and the
type-name -> class registry the layer families in caffeish.ops fill), weights
(binding a caffemodel's blobs to a graph's layers by name).

Imports formats; loads caffeish.ops by name (a plug-in load, see registry).
"""
from caffeish.graph.graph import AUTOMATIC, Graph, filter_net, layer_included, make_state, phase_value  # noqa: F401
