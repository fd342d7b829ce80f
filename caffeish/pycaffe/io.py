"""pycaffe's `caffe.io`, which is also `caffeish.io`.

pycaffe scripts use `caffe.io.Transformer`, `load_image`, `resize_image`,
`oversample`, the BlobProto / Datum <-> numpy conversions and `caffe_pb2`;
caffeish users read and write files with `io.read_prototxt`,
`read_caffemodel`, `write_caffemodel`, `read_binaryproto`, ...  This module
gathers both from where they live (caffeish.formats.io, caffeish.formats.arrays,
caffeish.pycaffe.transformer); `import caffeish.io` gives this module.
"""
from caffeish.formats.arrays import (array_to_blobproto, array_to_datum, arraylist_to_blobprotovector_str,
                                     blobproto_to_array, blobprotovector_str_to_arraylist, datum_to_array)
from caffeish.formats.io import *  # noqa: F401,F403
from caffeish.formats.io import __all__ as _formats_io_names
from caffeish.pycaffe.transformer import Transformer, caffe_pb2, load_image, oversample, resize_image

__all__ = list(_formats_io_names) + [
    "Transformer", "load_image", "resize_image", "oversample", "caffe_pb2",
    "blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
    "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
]
