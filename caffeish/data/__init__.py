"""Data: images, labels and scores around a net, shared by the tools.

preprocess (the one preprocessing spec: image -> net input, Caffe's defaults),
palette (colour maps, label files, overlays), dataset_meta (a dataset folder's
dataset.json), metrics (confusion matrices, score.py's segmentation scores,
comparing blobs with Caffe's).

Imports formats, graph, runtime and pycaffe.
"""
