"""Formats: bytes in and out, as Caffe writes and reads them.

schema (caffe_pb2 as `pb`, TEST/TRAIN), wire (protobuf wire format for weights
without walking floats in Python), io (prototxt, caffemodel, binaryproto, solver
files; atomic writes), upgrade (V0/V1 nets and old solvers, as Caffe's
UpgradeNetAsNeeded), arrays (BlobProto/Datum <-> numpy), images (image files ->
the 8-bit pixels Caffe reads), datum (Datum records and LMDB databases) and
prototxt_edit (tokenize prototxt text and edit values in place, keeping comments).

Imports only caffeish.errors, caffeish.values and caffeish.proto.
"""
