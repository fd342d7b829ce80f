"""The Caffe schema: our own proto/caffe.proto, compiled to caffeish.proto.caffe_pb2.

Regenerate the committed module after editing proto/caffe.proto with:

    python -m grpc_tools.protoc -Iproto --python_out=proto proto/caffe.proto

(`pip install grpcio-tools`); tests/test_schema.py fails when the two disagree.
"""
from caffeish.proto import caffe_pb2 as pb

TRAIN = pb.TRAIN
TEST = pb.TEST

__all__ = ["pb", "TRAIN", "TEST"]
