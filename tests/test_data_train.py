"""Data and ImageData at TRAIN: random crops and flips (Caffe's DataTransformer), the features/labels pair
kept aligned, ImageData's shuffle and rand_skip, and the prefetch thread."""
import gc
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.errors import CaffeishError
from caffeish.formats.datum import LmdbWriter, make_datum
from caffeish.formats.io import parse_text, write_binaryproto
from caffeish.formats.schema import TEST, TRAIN, pb
from caffeish.runtime.data_transform import DataTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_db(path, values):
    with LmdbWriter(path) as w:
        for i, v in enumerate(values):
            w.put(b"%08d" % i, v)
    return str(path)


def data_layer(source, batch, transform="", top='top: "data" top: "label"', name="data", extra=""):
    return (f'layer {{ name: "{name}" type: "Data" {top} transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB {extra} }} }}')


def net_of(text, phase=TRAIN, seed=1):
    return caffeish.Net(parse_text(text, pb.NetParameter()), phase=phase, seed=seed)


def layer_of(net, name):
    return next(n.layer for n in net.nodes if n.name == name)


def coded(n, h, w, channels=1):
    """n images whose pixel (h, w) holds h * w_max + w (so a window tells its offsets), plus 100 * item in
    channel 1 when there are 2 channels."""
    code = (np.arange(h)[:, None] * w + np.arange(w)).astype(np.uint8)
    out = np.empty((n, channels, h, w), np.uint8)
    for i in range(n):
        out[i, 0] = code
        if channels > 1:
            out[i, 1:] = i
    return out


def window_of(item, h, w, crop):
    """(h_off, w_off, mirrored) of a coded window (channel 0 of `item`, crop x crop)."""
    first = item[0]
    mirrored = crop > 1 and first[0, 0] > first[0, -1]
    corner = first[0, -1] if mirrored else first[0, 0]
    h_off, w_off = divmod(int(corner), w)
    return h_off, w_off, bool(mirrored)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("caffeish prefetch")]


# -- the transformer ---------------------------------------------------------------------------------


def test_the_transformer_draws_raw_std_mt19937_outputs():
    t = DataTransformer(pb.TransformationParameter(mirror=True), TRAIN)
    t.seed(5489)  # std::mt19937's default seed: the standard fixes its 10000th output
    raw = [t.rand(2 ** 32) for _ in range(10000)]
    assert raw[:3] == [3499211612, 581869302, 3890346734]
    assert raw[-1] == 4123659995
    assert not DataTransformer(pb.TransformationParameter(crop_size=3), TEST).random  # a TEST crop draws nothing
    assert DataTransformer(pb.TransformationParameter(crop_size=3), TRAIN).random


def test_mean_file_is_cropped_alike_and_not_mirrored():
    img = np.arange(1, 13, dtype=np.uint8).reshape(1, 3, 4)
    mean = np.array([[[.5, .5, .5, .5], [.5, .5, 1, 2], [.5, .5, 3, 5]]], np.float32)
    t = DataTransformer(pb.TransformationParameter(crop_size=2, mirror=True, scale=2), TRAIN)
    t.mean = mean
    t.seed(17)  # mt19937(17): r0 % 2 = 1 (mirror), r1 % 2 = 1 (h_off), r2 % 3 = 2 (w_off)
    # window [[7, 8], [11, 12]] - mean window [[1, 2], [3, 5]] = [[6, 6], [8, 7]], flipped, times 2
    np.testing.assert_array_equal(t(img), [[[12, 12], [14, 16]]])
    test = DataTransformer(pb.TransformationParameter(crop_size=2, mirror=True, scale=2), TEST)
    test.mean = mean
    test.seed(17)  # TEST: one draw (the flip) and the centre window (0, 1)
    # [[2, 3], [6, 7]] - [[.5, .5], [.5, 1]] = [[1.5, 2.5], [5.5, 6]], flipped, times 2
    np.testing.assert_array_equal(test(img), [[[5, 3], [12, 11]]])


# -- Data at TRAIN --------------------------------------------------------------------------------------


def train_offsets(net, forwards, h, w, crop):
    seen = []
    for _ in range(forwards):
        for item in net.forward()["data"]:
            seen.append(window_of(item, h, w, crop))
    return seen


def test_random_crops_cover_every_offset_and_repeat_for_a_seed(tmp_path):
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(coded(6, 9, 8))])
    text = data_layer(src, 4, "crop_size: 5")
    seen = train_offsets(net_of(text, seed=1), 40, 9, 8, 5)
    assert all(0 <= h <= 4 and 0 <= w <= 3 and not m for h, w, m in seen)
    assert {(h, w) for h, w, _ in seen} == {(h, w) for h in range(5) for w in range(4)}
    assert train_offsets(net_of(text, seed=1), 40, 9, 8, 5) == seen
    assert train_offsets(net_of(text, seed=2), 40, 9, 8, 5) != seen


def test_centre_crop_at_test_does_not_depend_on_the_seed(tmp_path):
    x = coded(3, 9, 8)
    src = write_db(tmp_path / "db", [make_datum(a) for a in x])
    for seed in (1, 2):
        net = net_of(data_layer(src, 2, "crop_size: 5"), phase=TEST, seed=seed)
        for batch in ([0, 1], [2, 0]):
            np.testing.assert_array_equal(net.forward()["data"], x[batch][:, :, 2:7, 1:6])


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_mirror_flips_about_half_the_items(tmp_path, phase):
    x = np.random.default_rng(0).integers(0, 256, (5, 2, 3, 4), dtype=np.uint8)
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(x)])
    net = net_of(data_layer(src, 5, "mirror: true"), phase=phase, seed=3)
    flips = []
    for _ in range(40):
        out = net.forward()
        for item, label in zip(out["data"], out["label"]):
            original = x[int(label)].astype(np.float32)
            if np.array_equal(item, original):
                flips.append(False)
            else:
                np.testing.assert_array_equal(item, original[:, :, ::-1])
                flips.append(True)
    assert 0.35 < np.mean(flips) < 0.65


def test_a_data_layer_subtracts_the_mean_window_before_the_flip(tmp_path):
    h, w, crop = 7, 6, 4
    x = coded(4, h, w)
    mean = np.random.default_rng(4).uniform(0, 50, (1, 1, h, w)).astype(np.float32)
    write_binaryproto(str(tmp_path / "mean.binaryproto"), mean)
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(x)])
    net = net_of(data_layer(src, 4, f'crop_size: {crop} mirror: true mean_file: "{tmp_path}/mean.binaryproto"'))
    kinds = set()
    for _ in range(10):
        out = net.forward()
        for item, label in zip(out["data"], out["label"]):
            src_item = x[int(label)].astype(np.float32)
            matches = []
            for h_off in range(h - crop + 1):
                for w_off in range(w - crop + 1):
                    win = (src_item - mean[0])[:, h_off:h_off + crop, w_off:w_off + crop]
                    for m in (False, True):
                        if np.array_equal(item, win[:, :, ::-1] if m else win):
                            matches.append((h_off, w_off, m))
            assert len(matches) == 1
            kinds.add(matches[0][2])
    assert kinds == {False, True}


def test_a_features_labels_pair_gets_the_same_window_and_flip(tmp_path):
    h, w, crop = 9, 11, 7
    feats = coded(6, h, w, channels=3)
    labels = coded(6, h, w)
    stage = tmp_path / "train"
    stage.mkdir()
    fsrc = write_db(stage / "features", [make_datum(a, encoding="png") for a in feats])
    lsrc = write_db(stage / "labels", [make_datum(a, encoding="png") for a in labels])
    transform = f"crop_size: {crop} mirror: true"
    text = (data_layer(fsrc, 2, transform + " mean_value: 1", 'top: "data"', "data")
            + data_layer(lsrc, 2, transform, 'top: "label"', "label"))

    def windows(seed):
        net = net_of(text, seed=seed)
        out = []
        for _ in range(9):
            got = net.forward()
            for image, label in zip(got["data"], got["label"]):
                image = image + 1  # mean_value 1 applies to the features only
                assert window_of(image, h, w, crop) == window_of(label, h, w, crop)
                out.append(window_of(label, h, w, crop))
        return out

    seen = windows(1)
    assert len({(a, b) for a, b, _ in seen}) > 3 and {m for _, _, m in seen} == {False, True}
    assert windows(1) == seen
    assert windows(2) != seen


def test_data_ignores_rand_skip(tmp_path):
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(coded(5, 2, 2))])
    for seed in (1, 2, 3):
        net = net_of(data_layer(src, 2, extra="rand_skip: 4"), seed=seed)
        assert net.forward()["label"].tolist() == [0, 1]


# -- ImageData ------------------------------------------------------------------------------------------


def image_list(tmp_path, n=7, broken=None):
    for i in range(n):
        if i != broken:
            Image.fromarray(np.full((2, 3, 3), i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"im{i}.png {i}\n" for i in range(n)))
    return str(tmp_path / "list.txt")


def image_data(tmp_path, batch, extra="", data_param=""):
    return (f'layer {{ name: "d" type: "ImageData" top: "data" top: "label" {data_param} '
            f'image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: {batch} '
            f'{extra} }} }}')


def labels_read(net, forwards):
    out = []
    for _ in range(forwards):
        got = net.forward()
        assert [int(v) for v in got["data"][:, 0, 0, 0]] == [int(v) for v in got["label"]]  # image matches label
        out += [int(v) for v in got["label"]]
    return out


def test_image_data_shuffles_at_setup_and_at_every_wrap(tmp_path):
    image_list(tmp_path)
    text = image_data(tmp_path, 3, "shuffle: true")
    seq = labels_read(net_of(text, seed=5), 7)  # three passes over 7 lines
    passes = [seq[0:7], seq[7:14], seq[14:21]]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert passes[0] != list(range(7))
    assert passes[0] != passes[1] and passes[1] != passes[2]
    assert labels_read(net_of(text, seed=5), 7) == seq
    assert labels_read(net_of(text, seed=6), 7) != seq
    assert labels_read(net_of(image_data(tmp_path, 3), seed=5), 7) == [i % 7 for i in range(21)]


def test_image_data_rand_skip_skips_a_random_number_of_lines(tmp_path):
    image_list(tmp_path)
    starts = set()
    for seed in range(8):
        seq = labels_read(net_of(image_data(tmp_path, 3, "rand_skip: 5"), seed=seed), 4)
        start = seq[0]
        assert 0 <= start < 5
        assert seq == [(start + i) % 7 for i in range(12)]  # then on in file order, wrapping
        starts.add(start)
        assert labels_read(net_of(image_data(tmp_path, 3, "rand_skip: 5"), seed=seed), 4) == seq
    assert len(starts) > 1


# -- prefetch -------------------------------------------------------------------------------------------


def batches(net, forwards):
    out = []
    for _ in range(forwards):
        got = net.forward()
        out.append({k: v.copy() for k, v in got.items()})
    return out


def test_prefetch_gives_the_batches_read_without_it(tmp_path):
    x = coded(5, 9, 8, channels=2)
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(x)])
    runs = []
    for prefetch in (0, 1, 4):
        net = net_of(data_layer(src, 3, "crop_size: 5 mirror: true", extra=f"prefetch: {prefetch}"), seed=8)
        runs.append(batches(net, 7))  # 21 records: four passes over 5, batches across the wrap
        layer_of(net, "data").close()
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a["data"], b["data"])
            np.testing.assert_array_equal(a["label"], b["label"])
    assert runs[0][1]["label"].tolist() == [3, 4, 0]
    image_list(tmp_path)
    shuffled = [labels_read(net_of(image_data(tmp_path, 3, "shuffle: true", f"data_param {{ prefetch: {p} }}"),
                                   seed=2), 6) for p in (0, 4)]
    assert shuffled[0] == shuffled[1]


@pytest.mark.parametrize("prefetch", [0, 4])
def test_a_damaged_record_fails_the_forward_that_reads_it(tmp_path, prefetch):
    x = coded(6, 3, 4)
    values = [make_datum(a, label=i) for i, a in enumerate(x)]
    values[4] = b"hello world"
    src = write_db(tmp_path / "db", values)
    net = net_of(data_layer(src, 2, extra=f"prefetch: {prefetch}"))
    assert net.forward()["label"].tolist() == [0, 1]
    assert net.forward()["label"].tolist() == [2, 3]
    with pytest.raises(CaffeishError, match=r"record '00000004'") as first:
        net.forward()
    assert "\n" not in str(first.value)
    with pytest.raises(CaffeishError) as again:
        net.forward()
    assert str(again.value) == str(first.value)
    layer = layer_of(net, "data")
    thread = layer._feed.thread
    layer.close()
    assert thread is None if prefetch == 0 else not thread.is_alive()


def test_a_missing_image_fails_the_forward_that_reads_it(tmp_path):
    image_list(tmp_path, n=5, broken=3)
    net = net_of(image_data(tmp_path, 2))
    assert net.forward()["label"].tolist() == [0, 1]
    with pytest.raises(CaffeishError, match=r"im3\.png"):
        net.forward()


def test_the_thread_starts_at_the_first_forward_and_stops_at_close(tmp_path):
    src = write_db(tmp_path / "db", [make_datum(a, label=i) for i, a in enumerate(coded(5, 3, 4))])
    net = net_of(data_layer(src, 2))
    layer = layer_of(net, "data")
    before = prefetch_threads()
    assert layer._feed is None  # building the net reads no batches
    assert net.forward()["label"].tolist() == [0, 1]
    thread = layer._feed.thread
    assert thread.daemon and thread.is_alive() and thread not in before
    layer.close()
    assert not thread.is_alive() and thread not in prefetch_threads()
    assert net.forward()["label"].tolist() == [0, 1]  # a closed layer starts again from the first record
    thread = layer._feed.thread
    del net, layer
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


SCRIPT = """
import sys
import caffeish
from caffeish.errors import CaffeishError
from caffeish.formats.io import parse_text
from caffeish.formats.schema import pb
text = sys.argv[1]
net = caffeish.Net(parse_text(text, pb.NetParameter()), phase=caffeish.TRAIN, seed=1)
print(net.forward()["label"].tolist())
try:
    for _ in range(int(sys.argv[2])):
        net.forward()
except CaffeishError as e:
    print("error:", e)
"""


@pytest.mark.parametrize("forwards", [0, 5])
def test_the_process_exits_cleanly_with_the_thread_running_or_failed(tmp_path, forwards):
    values = [make_datum(a, label=i) for i, a in enumerate(coded(40, 3, 4))]
    values[9] = b"hello world"
    src = write_db(tmp_path / "db", values)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), data_layer(src, 2), str(forwards)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0] == "[0.0, 1.0]"
    if forwards:
        assert len(lines) == 2 and lines[1].startswith("error: ") and "record '00000009'" in lines[1]
    else:
        assert len(lines) == 1
