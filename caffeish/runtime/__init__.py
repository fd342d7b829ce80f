"""Runtime: running a graph on arrays.

net (`Net`: allocation, weights, forward), backend (numpy or CuPy or the CPU
kernel harness; set_mode_cpu/gpu), im2col (convolution as matrix products),
fillers (Caffe's weight fillers), data_transform (Caffe's DataTransformer and
OpenCV-exact resizing), blobs (the Blob, Param and Layer objects pycaffe
scripts see, and `caffe.Layer` for Python layers).  The layer families
(caffeish.ops, the layers/ folder) and our CUDA kernels (caffeish.kernels)
belong to this stage.

Imports formats and graph.
"""
