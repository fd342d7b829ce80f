"""Data (LMDB) and ImageData layers at run time, with transform_param's TEST semantics."""
import io
import os

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.runtime.data_transform import DataTransformer, resize_linear
from caffeish.formats.datum import (BatchCursor, LmdbReader, LmdbWriter, NotDatumError, datum_array, decode_image,
                            make_datum, parse_datum)
from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.io import parse_text, write_binaryproto
from caffeish.formats.schema import pb


def write_db(path, values):
    with LmdbWriter(path) as w:
        for i, v in enumerate(values):
            w.put(b"%08d" % i, v)
    return str(path)


def net_of(text):
    return caffeish.Net(parse_text(text, pb.NetParameter()))


def data_layer(source, batch, transform="", top='top: "data" top: "label"', name="data"):
    return (f'layer {{ name: "{name}" type: "Data" {top} transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}')


def images(n, c=3, h=6, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def test_raw_records_come_in_key_order_and_wrap_around(tmp_path):
    x = images(5)
    src = write_db(tmp_path / "db", [make_datum(a, label=i + 10) for i, a in enumerate(x)])
    net = net_of(data_layer(src, 2, "scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30"))
    assert net.inputs == []  # the layer reads its database: nothing to feed
    mean = np.array([10, 20, 30], np.float32).reshape(3, 1, 1)
    for batch in ([0, 1], [2, 3], [4, 0], [1, 2]):
        out = net.forward()
        want = (x[batch].astype(np.float32) - mean) * np.float32(0.5)
        np.testing.assert_array_equal(out["data"], want)
        np.testing.assert_array_equal(out["label"], np.array(batch) + 10)


def test_float_data_and_a_single_mean_value(tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 5)).astype(np.float32)
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(x)])
    out = net_of(data_layer(src, 3, "mean_value: 0.25")).forward()
    np.testing.assert_array_equal(out["data"], x - np.float32(0.25))


def test_encoded_png_records_decode_to_bgr_and_force_gray(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    src = write_db(tmp_path / "db", [pb.Datum(encoded=True, data=buf.getvalue(), label=4)])
    out = net_of(data_layer(src, 1)).forward()
    np.testing.assert_array_equal(out["data"][0], rgb[:, :, ::-1].transpose(2, 0, 1))
    assert out["label"].tolist() == [4]
    gray = net_of(data_layer(src, 1, "force_gray: true")).forward()["data"]
    want = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)
    assert gray.shape == (1, 1, 6, 7)
    np.testing.assert_array_equal(gray[0, 0], want)


def test_mean_file_and_centre_crop(tmp_path):
    x = images(2, h=9, w=8)
    mean = np.random.default_rng(3).uniform(0, 255, (1, 3, 9, 8)).astype(np.float32)
    write_binaryproto(str(tmp_path / "mean.binaryproto"), mean)
    src = write_db(tmp_path / "db", [make_datum(a) for a in x])
    net = net_of(data_layer(src, 2, f'crop_size: 5 mean_file: "{tmp_path}/mean.binaryproto" scale: 0.25'))
    out = net.forward()["data"]
    # Caffe's TEST crop: h_off = (9 - 5) // 2 = 2, w_off = (8 - 5) // 2 = 1
    want = (x[:, :, 2:7, 1:6].astype(np.float32) - mean[:, :, 2:7, 1:6]) * np.float32(0.25)
    np.testing.assert_array_equal(out, want)


def test_paired_image_and_label_databases_stay_aligned_under_a_crop(tmp_path):
    x = images(5, h=9, w=11, seed=7)
    labels = (x[:, :1].astype(np.int64) * 7 + np.arange(11)) % 5  # a different map per record
    fsrc = write_db(tmp_path / "features", [make_datum(a, encoding="png") for a in x])
    lsrc = write_db(tmp_path / "labels", [make_datum(lab.astype(np.uint8), encoding="png") for lab in labels])
    text = (data_layer(fsrc, 2, "crop_size: 7", 'top: "data"', "data")
            + data_layer(lsrc, 2, "crop_size: 7", 'top: "label"', "label"))
    net = net_of(text)
    for batch in ([0, 1], [2, 3], [4, 0]):
        out = net.forward()
        np.testing.assert_array_equal(out["data"], x[batch][:, :, 1:8, 2:9])
        np.testing.assert_array_equal(out["label"], labels[batch][:, :, 1:8, 2:9])


def test_a_readable_source_with_a_given_shape_is_fed_by_the_caller(tmp_path):
    src = write_db(tmp_path / "db", [make_datum(a) for a in images(2)])
    net = caffeish.Net(parse_text(data_layer(src, 2), pb.NetParameter()),
                       input_shapes={"data": (2, 3, 6, 7)})
    assert net.inputs == ["data", "label"]
    x = np.ones((2, 3, 6, 7), np.float32)
    np.testing.assert_array_equal(net.forward(data=x, label=np.zeros(2))["data"], x)


def test_a_batch_of_mixed_sizes_names_the_record(tmp_path):
    src = write_db(tmp_path / "db", [make_datum(images(1)[0]), make_datum(images(1, h=5)[0])])
    net = net_of(data_layer(src, 2))
    with pytest.raises(ShapeError, match="record '00000001'.*first of its batch"):
        net.forward()


def test_mean_value_count_must_fit_the_channels(tmp_path):
    src = write_db(tmp_path / "db", [make_datum(a) for a in images(1)])
    with pytest.raises(ShapeError, match="2 mean_value entries .* 3 channels"):
        net_of(data_layer(src, 1, "mean_value: 1 mean_value: 2")).forward()


def test_a_database_of_other_things_says_what_it_holds(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buf, format="PNG")
    src = write_db(tmp_path / "pngs", [buf.getvalue()])
    with pytest.raises(CaffeishError, match="bare PNG image file"):
        net_of(data_layer(src, 1))
    with pytest.raises(NotDatumError, match="text 'hello"):
        parse_datum(b"hello world", "a record")
    blob = pb.BlobProto(num=1, channels=1, height=1, width=2, data=[1.0, 2.0]).SerializeToString()
    with pytest.raises(NotDatumError, match="BlobProto"):
        parse_datum(blob)
    bad = pb.Datum(channels=3, height=2, width=2, data=b"\x00" * 5).SerializeToString()
    with pytest.raises(NotDatumError, match="5 data bytes"):
        parse_datum(bad)


def test_readers_never_write_to_the_database_folder(tmp_path):
    db = tmp_path / "db"
    write_db(db, [make_datum(a) for a in images(3)])
    os.remove(db / "lock.mdb")
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in db.iterdir()}
    net = net_of(data_layer(str(db), 2))
    net.forward()
    with LmdbReader(db) as r:
        assert len(r) == 3 and r.first()[0] == b"00000000"
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in db.iterdir()}
    assert after == before  # no lock.mdb created, data.mdb untouched


def test_cursor_wraps_and_the_writer_grows_the_map(tmp_path):
    big = np.zeros((1, 300, 300), np.uint8)
    path = tmp_path / "db"
    with LmdbWriter(path, map_size=1 << 16, txn_records=3) as w:  # 64 KiB map, 90 KB records
        for i in range(7):
            big[0, 0, 0] = i
            w.put(b"%08d" % i, make_datum(big))
    with LmdbReader(path) as r:
        assert len(r) == 7
        cursor = BatchCursor(r)
        keys = [k for _ in range(3) for k, _ in cursor.take(3)]
        assert keys == [b"%08d" % (i % 7) for i in range(9)]
        assert datum_array(r.get(b"00000005"))[0, 0, 0] == 5


def test_decode_keeps_alpha_and_expands_palettes():
    buf = io.BytesIO()
    rgba = np.random.default_rng(5).integers(0, 256, (2, 3, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    np.testing.assert_array_equal(out, rgba[:, :, [2, 1, 0, 3]].transpose(2, 0, 1))
    buf = io.BytesIO()
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue())[:, 0, 1], [60, 50, 40])


def test_transformer_refuses_conflicting_settings():
    with pytest.raises(ShapeError, match="not both"):
        DataTransformer(pb.TransformationParameter(mean_file="m", mean_value=[1]))
    with pytest.raises(ShapeError, match="force_color and force_gray"):
        DataTransformer(pb.TransformationParameter(force_color=True, force_gray=True))
    with pytest.raises(ShapeError, match="crop_size 5 is larger"):
        DataTransformer(pb.TransformationParameter(crop_size=5))(np.zeros((1, 4, 8), np.uint8))


def test_image_data_reads_its_list_with_resize(tmp_path):
    rng = np.random.default_rng(6)
    pics = [rng.integers(0, 256, (4, 6, 3), dtype=np.uint8) for _ in range(3)]
    for i, p in enumerate(pics):
        Image.fromarray(p).save(tmp_path / f"im {i}.png")
    (tmp_path / "list.txt").write_text("im 0.png 5\nim 1.png 6\nim 2.png 7\n")
    text = (f'layer {{ name: "d" type: "ImageData" top: "data" top: "label" transform_param {{ scale: 2 }} '
            f'image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 2 }} }}')
    net = net_of(text)
    out = net.forward()
    want = np.stack([p[:, :, ::-1].transpose(2, 0, 1) for p in pics[:2]]).astype(np.float32) * 2
    np.testing.assert_array_equal(out["data"], want)
    assert out["label"].tolist() == [5, 6]
    assert net.forward()["label"].tolist() == [7, 5]  # wraps around
    resized = net_of(text.replace("batch_size: 2", "batch_size: 1 new_height: 8 new_width: 3 is_color: false"))
    gray = np.asarray(Image.fromarray(pics[0]).convert("L"))
    np.testing.assert_array_equal(resized.forward()["data"][0, 0], resize_linear(gray, 8, 3).astype(np.float32) * 2)


def test_sixteen_bit_images_keep_their_high_byte_as_opencv_reads_them(tmp_path):
    """cv::imread / imdecode with IMREAD_COLOR or IMREAD_GRAYSCALE keep 8 bits of a 16-bit PNG: value >> 8."""
    values = np.array([[256, 32768, 65535, 511]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    want = (values >> 8).astype(np.float32)  # 1, 128, 255, 1
    (tmp_path / "list.txt").write_text("deep.png 3\n")
    text = (f'layer {{ name: "d" type: "ImageData" top: "data" top: "label" '
            f'image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 1 '
            f'is_color: false }} }}')
    np.testing.assert_array_equal(net_of(text).forward()["data"][0, 0], want)
    colour = net_of(text.replace("is_color: false", "is_color: true")).forward()["data"][0]
    np.testing.assert_array_equal(colour, np.broadcast_to(want, (3,) + want.shape))
    raw = (tmp_path / "deep.png").read_bytes()
    np.testing.assert_array_equal(decode_image(raw, color=False)[0], want)
    np.testing.assert_array_equal(decode_image(raw, color=True), np.broadcast_to(want, (3,) + want.shape))
    with pytest.raises(CaffeishError, match="16-bit or float"):
        decode_image(raw)  # unchanged (native) decoding: Caffe's DataTransformer takes 8-bit only


def test_image_data_with_a_missing_image_names_it(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 0\ngone.png 1\n")
    text = (f'layer {{ name: "d" type: "ImageData" top: "data" top: "label" '
            f'image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 2 }} }}')
    with pytest.raises(CaffeishError, match="gone.png"):
        net_of(text).forward()
