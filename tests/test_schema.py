"""The schema is wire- and text-compatible with BVLC Caffe, and the committed module matches it."""
import csv
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as FD

from caffeish.proto import caffe_pb2
from conftest import ROOT, shared_path

TYPE_NAMES = {
    FD.TYPE_DOUBLE: "double", FD.TYPE_FLOAT: "float", FD.TYPE_INT64: "int64", FD.TYPE_UINT64: "uint64",
    FD.TYPE_INT32: "int32", FD.TYPE_FIXED64: "fixed64", FD.TYPE_FIXED32: "fixed32", FD.TYPE_BOOL: "bool",
    FD.TYPE_STRING: "string", FD.TYPE_BYTES: "bytes", FD.TYPE_UINT32: "uint32", FD.TYPE_SFIXED32: "sfixed32",
    FD.TYPE_SFIXED64: "sfixed64", FD.TYPE_SINT32: "sint32", FD.TYPE_SINT64: "sint64",
}


def _label(f):
    if f.is_required:
        return "required"
    return "repeated" if f.is_repeated else "optional"


def _rows(name):
    with open(shared_path("caffe", name), newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _message(full_name):
    desc = caffe_pb2.DESCRIPTOR
    parts = full_name.split(".")
    d = desc.message_types_by_name[parts[0]]
    for p in parts[1:]:
        d = d.nested_types_by_name[p]
    return d


def _type_name(f):
    if f.type == FD.TYPE_MESSAGE:
        return f.message_type.full_name.removeprefix("caffe.")
    if f.type == FD.TYPE_ENUM:
        return f.enum_type.full_name.removeprefix("caffe.")
    return TYPE_NAMES[f.type]


def _default(f, expected):
    if not f.has_default_value:
        return ""
    v = f.default_value
    if f.type == FD.TYPE_ENUM:
        return f.enum_type.values_by_number[v].name
    if f.type == FD.TYPE_BOOL:
        return "true" if v else "false"
    if f.type == FD.TYPE_STRING:
        return v
    if f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return v  # compared numerically below
    return str(v)


def test_every_field_matches_caffe():
    rows = _rows("fields.tsv")
    assert len(rows) > 400
    seen = {}
    for r in rows:
        msg = _message(r["message"])
        f = msg.fields_by_name.get(r["field_name"])
        assert f is not None, f"{r['message']}.{r['field_name']} missing from caffe.proto"
        where = f"{r['message']}.{r['field_name']}"
        assert f.number == int(r["number"]), where
        assert _label(f) == r["label"], where
        assert _type_name(f) == r["type"], where
        packed = f.GetOptions().packed if f.GetOptions().HasField("packed") else False
        assert packed == (r["packed"] == "yes"), where
        got = _default(f, r["default"])
        want = r["default"]
        if f.type == FD.TYPE_STRING and want == '""':
            assert f.has_default_value and got == "", where
        elif f.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE) and want != "":
            assert f.has_default_value and got == pytest.approx(float(want), rel=1e-7), where
        else:
            assert got == want, where
        seen.setdefault(r["message"], set()).add(r["field_name"])
    # ...and caffe.proto has no field that Caffe lacks.
    for name, fields in seen.items():
        assert set(_message(name).fields_by_name) == fields, name


def test_every_enum_matches_caffe():
    rows = _rows("enums.tsv")
    values = {}
    for r in rows:
        values.setdefault(r["enum"], {})[r["value_name"]] = int(r["number"])
    desc = caffe_pb2.DESCRIPTOR
    for enum_name, expected in values.items():
        if "." in enum_name:
            owner, short = enum_name.rsplit(".", 1)
            e = _message(owner).enum_types_by_name[short]
        else:
            e = desc.enum_types_by_name[enum_name]
        assert {v.name: v.number for v in e.values} == expected, enum_name


def test_committed_module_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to compile proto/caffe.proto (pip install .[test])")
    out = tmp_path / "caffe.desc"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}",
         str(ROOT / "proto" / "caffe.proto")],
        check=True,
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    # --descriptor_set_out adds json_name to every field and keeps float defaults as
    # written, while the Python generator prints them as float32; compare the values.
    for fd in (compiled, committed):
        for msg in _all_messages(fd.message_type):
            for field in msg.field:
                field.ClearField("json_name")
                if field.type == field.TYPE_FLOAT and field.HasField("default_value"):
                    field.default_value = repr(float(np.float32(field.default_value)))
    assert compiled == committed, "proto/caffe_pb2.py is stale: regenerate it (see caffeish/formats/schema.py)"


def _all_messages(messages):
    for m in messages:
        yield m
        yield from _all_messages(m.nested_type)


def test_proto_is_our_own_file():
    text = (ROOT / "proto" / "caffe.proto").read_text()
    assert "package caffe;" in text and 'syntax = "proto2";' in text
