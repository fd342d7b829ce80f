"""Reading and writing caffemodel, prototxt and binaryproto files."""
import os
import pathlib

import numpy as np
import pytest

from caffeish.formats import io, wire
from caffeish.errors import CaffeishError, CorruptFileError, ForkFieldError, ParseError
from caffeish.formats.schema import pb
from conftest import SHARED, shared_path


def golden_models():
    root = SHARED / "golden"
    return sorted(root.glob("*/weights.caffemodel")) if root.exists() else []


def shared_models():
    root = SHARED / "models"
    return sorted(root.rglob("*.caffemodel")) if root.exists() else []


def test_shared_data_present():
    shared_path("golden")
    assert golden_models() and shared_models()


@pytest.mark.parametrize("path", golden_models(), ids=lambda p: p.parent.name)
def test_golden_weights_equal_caffes_params(path):
    """Caffe's own params.npz (where recorded) equals what we read from its caffemodel."""
    model = io.read_caffemodel(path)
    params = path.parent / "params.npz"
    if not params.exists():
        pytest.skip("no params.npz for this case")
    arrays = model.arrays()
    expected = np.load(params)
    assert expected.files
    for key in expected.files:
        layer, index = key.rsplit("/", 1)
        got = arrays[layer][int(index)]
        want = expected[key]
        assert got.dtype == np.float32
        assert got.shape == want.shape, key
        assert np.array_equal(got, want), key


@pytest.mark.parametrize("path", golden_models(), ids=lambda p: p.parent.name)
def test_caffe_written_models_rewrite_byte_for_byte(path):
    """A current-format caffemodel written by Caffe is reproduced byte for byte (when no upgrade applies)."""
    model = io.read_caffemodel(path, upgrade=False)
    assert io.serialize_model(model.net, model.blobs) == path.read_bytes()


@pytest.mark.parametrize("path", golden_models() + shared_models(), ids=lambda p: p.parent.name + "/" + p.name)
def test_round_trip_is_lossless(path, tmp_path):
    """read -> write -> read gives the same message, legacy V1 files included (they come back upgraded)."""
    model = io.read_caffemodel(path)
    out = tmp_path / "copy.caffemodel"
    io.write_caffemodel(out, model.net, model.blobs, inputs=[path])
    again = io.read_caffemodel(out)
    assert again.changes == []
    assert again.net == model.net
    assert again.full_message() == model.full_message()
    # ...and protobuf itself parses what we wrote into the same message.
    assert pb.NetParameter.FromString(out.read_bytes()) == model.full_message()


@pytest.mark.parametrize("path", shared_models(), ids=lambda p: p.parent.name + "/" + p.name)
def test_blob_decoding_matches_protobuf_parse(path):
    """Our blob decoding agrees with the protobuf library on every real caffemodel (V1 and current)."""
    ours = io.read_caffemodel(path, upgrade=False)
    theirs = pb.NetParameter.FromString(path.read_bytes())
    layers = theirs.layers if len(theirs.layers) else theirs.layer
    assert len(layers) == len(ours.blobs)
    for layer, records in zip(layers, ours.blobs):
        assert len(layer.blobs) == len(records)
        for blob, rec in zip(layer.blobs, records):
            assert np.array_equal(np.array(blob.data, dtype=np.float32), rec.data)
            if blob.HasField("num") or blob.HasField("channels"):
                assert rec.legacy == (blob.num, blob.channels, blob.height, blob.width)
            else:
                assert rec.legacy is None and rec.shape == tuple(blob.shape.dim)


def test_v1_caffemodel_is_upgraded_with_blobs_following_layers():
    path = shared_path("models", "everpeace_caffe", "examples", "mnist", "lenet_iter_10000.caffemodel")
    model = io.read_caffemodel(path)
    assert model.changes and not len(model.net.layers)
    arrays = model.arrays()
    assert arrays["conv1"][0].shape == (20, 1, 5, 5)
    assert arrays["ip2"][0].shape == (10, 500) or arrays["ip2"][0].shape == (1, 1, 10, 500)
    by_name = {l.name: l for l in model.net.layer}
    assert by_name["conv1"].type == "Convolution"


def _blob_bytes(**fields):
    blob = pb.BlobProto(**fields)
    return blob.SerializeToString()


def test_blob_legacy_shape_double_data_and_unpacked():
    raw = _blob_bytes(num=1, channels=2, double_data=[1.5, 2.5])
    rec = wire.decode_blob(memoryview(raw), 0, len(raw))
    # Legacy fields present: unset ones read as 0, so the shape is (1, 2, 0, 0) with count 0.
    assert rec.legacy == (1, 2, 0, 0) and rec.count == 0
    raw = _blob_bytes(num=1, channels=2, height=1, width=1, double_data=[1.5, 2.5], data=[9.0, 9.0])
    rec = wire.decode_blob(memoryview(raw), 0, len(raw))
    assert rec.data.dtype == np.float64 and rec.array().dtype == np.float32
    assert rec.array().tolist() == [[[[1.5]], [[2.5]]]]  # double_data wins over data
    # An unpacked repeated float (legal protobuf) reads the same.
    unpacked = b"".join(b"\x2d" + np.float32(v).tobytes() for v in (1, 2, 3))
    shape = pb.BlobShape(dim=[3]).SerializeToString()
    raw = unpacked + b"\x3a" + bytes([len(shape)]) + shape
    rec = wire.decode_blob(memoryview(raw), 0, len(raw))
    assert rec.array().tolist() == [1, 2, 3]


def test_write_uses_caffe_field_order_for_blobs():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    chunks = wire.encode_blob(wire.BlobRecord.from_array(arr))
    raw = b"".join(bytes(c) for c in chunks)
    assert raw == pb.BlobProto(shape=pb.BlobShape(dim=[2, 3]), data=arr.ravel().tolist()).SerializeToString()


def test_truncated_caffemodel_is_an_error_not_a_crash(tmp_path):
    path = shared_path("golden", "lenet_real_weights", "weights.caffemodel")
    raw = path.read_bytes()
    for cut in (1, 7, 100, len(raw) // 3, len(raw) // 2, len(raw) - 5, len(raw) - 1):
        bad = tmp_path / f"cut{cut}.caffemodel"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError) as e:
            io.read_caffemodel(bad)
        assert str(bad) in str(e.value)


def test_corrupt_caffemodel_never_crashes(tmp_path):
    raw = bytearray(shared_path("golden", "conv", "weights.caffemodel").read_bytes())
    rng = np.random.default_rng(0)
    for i in range(60):
        bad = bytearray(raw)
        for pos in rng.integers(0, len(bad), size=3):
            bad[pos] = int(rng.integers(0, 256))
        p = tmp_path / f"bad{i}.caffemodel"
        p.write_bytes(bytes(bad))
        try:
            io.read_caffemodel(p)
        except CaffeishError:
            pass  # a clear error is fine; anything else fails the test


def test_blob_count_mismatch_names_layer(tmp_path):
    net = pb.NetParameter()
    layer = net.layer.add(name="ip", type="InnerProduct")
    layer.blobs.add(shape=pb.BlobShape(dim=[2, 3]), data=[1, 2, 3])
    p = tmp_path / "m.caffemodel"
    p.write_bytes(net.SerializeToString())
    with pytest.raises(CorruptFileError, match=r"layer 'ip' blob 0.*\(2, 3\).*6 values.*3"):
        io.read_caffemodel(p)


def test_other_files_are_refused_clearly(tmp_path):
    proto = shared_path("models", "bvlc_caffe", "models", "bvlc_alexnet", "deploy.prototxt")
    with pytest.raises(CorruptFileError, match="prototxt"):
        io.read_caffemodel(proto)
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError, match="empty"):
        io.read_caffemodel(empty)
    h5 = tmp_path / "w.caffemodel.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(CorruptFileError, match="HDF5"):
        io.read_caffemodel(h5)
    with pytest.raises(CaffeishError, match="cannot read"):
        io.read_caffemodel(tmp_path / "missing.caffemodel")
    with pytest.raises(ParseError, match="binary"):
        io.read_prototxt(shared_path("golden", "conv", "weights.caffemodel"))


def test_binaryproto_mean_file(tmp_path):
    mean = io.read_binaryproto(shared_path("models", "tensorrt_mnist", "data", "mnist", "mnist_mean.binaryproto"))
    assert mean.shape == (1, 1, 28, 28) and mean.dtype == np.float32
    assert 0 < mean.mean() < 255
    out = tmp_path / "mean.binaryproto"
    io.write_binaryproto(out, mean)
    assert np.array_equal(io.read_binaryproto(out), mean)
    raw = out.read_bytes()
    (tmp_path / "cut.binaryproto").write_bytes(raw[:-3])
    with pytest.raises(CorruptFileError):
        io.read_binaryproto(tmp_path / "cut.binaryproto")


def test_prototxt_error_names_file_line_column_and_token(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom: "x" top "y"\n}\n')
    with pytest.raises(ParseError) as e:
        io.read_prototxt(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:5:")
    assert "'\"y\"'" in msg or "token" in msg


def test_prototxt_bad_enum_value(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('layer {\n  name: "p"\n  type: "Pooling"\n  pooling_param { pool: MAXIMUM }\n}\n')
    with pytest.raises(ParseError, match=rf"{p}:4:\d+:.*MAXIMUM"):
        io.read_prototxt(p)


def _parse_check_rows():
    path = SHARED / "models" / "PARSE_CHECK.tsv"
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [r for r in rows if r[1] == "caffe.NetParameter"]


@pytest.mark.parametrize("row", _parse_check_rows(), ids=lambda r: r[0])
def test_parse_check(row):
    """Every prototxt BVLC Caffe parses loads; every fork-only one gets an error naming its field."""
    path = SHARED / "models" / row[0]
    if row[2] == "ok":
        net, _ = io.read_prototxt(path)
        assert len(net.layer) > 0 and not len(net.layers)
    else:
        field = row[2].split('has no field named "')[1].split('"')[0]
        line_col = row[2].split("input:")[1].split(":")[:2]
        with pytest.raises(ForkFieldError) as e:
            io.read_prototxt(path)
        msg = str(e.value)
        assert f"'{field}'" in msg and "not" in msg and "BVLC Caffe" in msg
        assert f"{path}:{line_col[0]}:" in msg


def test_prototxt_round_trip(tmp_path):
    for path in sorted((SHARED / "golden").glob("*/net.prototxt"))[:50] or [pytest.skip("no shared data")]:
        net, _ = io.read_prototxt(path)
        out = tmp_path / "n.prototxt"
        io.write_prototxt(out, net, inputs=[path])
        again, changes = io.read_prototxt(out)
        assert again == net and changes == []


def test_writes_are_atomic_and_never_touch_inputs(tmp_path, monkeypatch):
    src = tmp_path / "in.prototxt"
    src.write_text('name: "n"\n')
    net, _ = io.read_prototxt(src)
    with pytest.raises(CaffeishError, match="overwrite an input"):
        io.write_prototxt(src, net, inputs=[src])
    assert src.read_text() == 'name: "n"\n'
    # A failure while writing leaves the previous output in place and no temp file behind.
    out = tmp_path / "out.caffemodel"
    out.write_bytes(b"old")
    bad = pb.NetParameter()
    bad.layer.add(name="a")
    with pytest.raises(CaffeishError):
        io.write_caffemodel(out, bad, [[np.zeros(3)], [np.zeros(2)]])
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["in.prototxt", "out.caffemodel"]


def test_written_files_get_the_umask_mode_not_the_temp_files_private_one(tmp_path):
    out = tmp_path / "mean.binaryproto"
    old = os.umask(0o022)
    try:
        io.write_binaryproto(out, np.zeros((1, 2, 2), np.float32))
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o644


def test_prototxt_with_byte_order_mark(tmp_path):
    p = tmp_path / "bom.prototxt"
    p.write_bytes(b"\xef\xbb\xbfname: \"n\"\n")
    net, _ = io.read_prototxt(p)
    assert net.name == "n"


# ---------------------------------------------------------------------------- what a file is


LENET = pathlib.Path(__file__).resolve().parent.parent / "examples" / "lenet_deploy.prototxt"


@pytest.fixture
def swapped_files(tmp_path):
    """A lenet prototxt, its caffemodel (from fillers) and a PNG and a JPEG image."""
    from PIL import Image

    import caffeish
    weights = tmp_path / "lenet.caffemodel"
    caffeish.Net(str(LENET), caffeish.TEST, seed=0).save(str(weights))
    png, jpg = tmp_path / "x.png", tmp_path / "x.jpg"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(jpg)
    return str(LENET), str(weights), str(png), str(jpg)


def test_a_caffemodel_or_an_image_where_the_net_goes_is_named_as_such(swapped_files):
    net, weights, png, jpg = swapped_files
    with pytest.raises(ParseError, match=r"lenet.caffemodel: this is a binary file \(a caffemodel\?\), not a "
                                         r"prototxt; are the net and the weights given in the wrong order\?"):
        io.read_net(weights)
    with pytest.raises(ParseError, match="this is a binary file"):
        io.read_prototxt(weights)
    for image, kind in ((png, "PNG"), (jpg, "JPEG")):
        with pytest.raises(ParseError, match=f"x.{image[-3:]}: this is a {kind} image, not a prototxt"):
            io.read_net(image)
    # Asked for explicitly, a caffemodel's own layer list is a net.
    assert [l.name for l in io.read_net(weights, caffemodel=True).layer][:2] == ["data", "conv1"]


def test_a_prototxt_or_an_image_where_the_weights_go_is_named_as_such(swapped_files):
    net, weights, png, jpg = swapped_files
    with pytest.raises(CorruptFileError, match=r"lenet_deploy.prototxt: this is a text file \(a prototxt\?\), not a "
                                               r"caffemodel; are the net and the weights given in the wrong order\?"):
        io.read_caffemodel(net)
    with pytest.raises(CorruptFileError, match="x.png: this is a PNG image, not a caffemodel"):
        io.read_caffemodel(png)
    with pytest.raises(CorruptFileError, match="x.jpg: this is a JPEG image, not a binaryproto"):
        io.read_binaryproto(jpg)
    with pytest.raises(CorruptFileError, match="not a binaryproto"):
        io.read_binaryproto(net)


def test_every_tool_says_the_net_and_weights_are_swapped(swapped_files, tmp_path, capsys):
    """summary used to say "unknown bottom blob 'data'" (the caffemodel's layers read as the net)."""
    import caffeish
    from caffeish.tools.cli import main
    net, weights, png, _ = swapped_files
    deploy_without_input = tmp_path / "w.caffemodel"  # Caffe writes no `input:` fields into a caffemodel
    model = io.read_caffemodel(weights)
    io.write_caffemodel(deploy_without_input, model.net, model.blobs)
    for argv in (["summary", str(deploy_without_input), net], ["summary", weights, net],
                 ["classify", weights, net, png], ["segment", weights, net, png, "-o", str(tmp_path / "out")],
                 ["offsets", weights]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "wrong order" in err and "unknown bottom" not in err, (argv, err)
    assert main(["summary", net, png]) == 1
    assert "x.png: this is a PNG image, not a caffemodel" in capsys.readouterr().err
    with pytest.raises(CaffeishError, match="wrong order"):
        caffeish.Net(weights, net, caffeish.TEST)
    with pytest.raises(CaffeishError, match="wrong order"):
        caffeish.Net(net, net, caffeish.TEST)


def test_file_kind():
    assert io.file_kind("x", b"")[0] == "empty"
    assert io.file_kind("x", b"\x89PNG\r\n\x1a\n....") == ("image", "PNG")
    assert io.file_kind("x", b"BM" + bytes(12) + (40).to_bytes(4, "little")) == ("image", "BMP")
    assert io.file_kind("x", b"RIFF\0\0\0\0WEBPVP8 ") == ("image", "WebP")
    assert io.file_kind("x", b"P6\n2 2\n255\n") == ("image", "PNM")
    assert io.file_kind("x", b'name: "x"\nlayer {}\n') == ("text", None)
    assert io.file_kind("x", pb.NetParameter(name="x", layer=[pb.LayerParameter(name="a")]).SerializeToString()) \
        == ("binary", None)


def test_atomic_outputs_accept_inputs_that_no_longer_exist(tmp_path):
    # A net's prototxt deleted since it was read (or a relative data source) is no reason to fail.
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with io.atomic_output(out, inputs=[tmp_path / "gone.prototxt"]) as f:
        f.write(b"new")
    with io.atomic_outputs([tmp_path / "a.bin"], inputs=[tmp_path / "gone.prototxt"]) as files:
        files[0].write(b"a")
    assert out.read_bytes() == b"new" and (tmp_path / "a.bin").read_bytes() == b"a"
    with pytest.raises(CaffeishError, match="refusing to overwrite an input"):
        with io.atomic_output(out, inputs=[out]) as f:
            f.write(b"x")
