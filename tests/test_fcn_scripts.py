"""fcn.berkeleyvision.org's scripts run unchanged on caffeish, through the compat wrapper.

surgery.py (transplant, interp), score.py (fast_hist, compute_hist, do_seg_tests: seg_tests
with the solver), infer.py and vis.py, and voc_layers.VOCSegDataLayer as the data layer, from
../shared/models/fcn; and voc-fcn8s/solve.py's pattern (SGDSolver, copy_from, surgery.interp,
step, score.seg_tests) with fewer iterations.  They are Python 2: the only change made to them is print statements
-> print() calls and xrange -> range (`py2to3` below).  Each runs in a subprocess under
`python -m caffeish.pycaffe.compat` (so `import caffe` gives caffeish), on small nets and
images built here; every number is checked against a numpy computation of its own.
"""
import io
import json
import re
import textwrap
import tokenize

import numpy as np
import pytest
from PIL import Image

import caffeish
from caffeish.formats import io as cio
from conftest import shared_path
from test_compat import wrapped

SCRIPTS = ("surgery.py", "score.py", "infer.py", "vis.py", "voc_layers.py")
MEAN = (104.00698793, 116.66876762, 122.67891434)  # infer.py's and the VOC nets' BGR mean


# ------------------------------------------------------------------ Python 2 -> 3 (print, xrange)


def py2to3(source):
    """Python 2 source with print statements and xrange made Python 3; nothing else changes.

    `print a, b` -> `print(a, b)` (a statement continued with a backslash included),
    `print` -> `print()`; `xrange` -> `range`.  `print >>f` and a trailing comma (no newline)
    have no plain print() spelling and are refused.
    """
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(pos):
        return starts[pos[0] - 1] + pos[1]

    edits = []  # (start, end, text), applied from the end
    skip = {tokenize.NL, tokenize.COMMENT}
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.string == "xrange":
            edits.append((offset(tok.start), offset(tok.end), "range"))
        if tok.type != tokenize.NAME or tok.string != "print":
            continue
        prev = next((t for t in reversed(tokens[:i]) if t.type not in skip), None)
        if prev is not None and not (prev.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                                   tokenize.ENCODING) or prev.string in (";", ":")):
            continue  # not at a statement's start (a name in an expression)
        # The statement's last token: before the NEWLINE, or a ';' or comment at depth 0.
        depth, j, last = 0, i + 1, tok
        while j < len(tokens):
            t = tokens[j]
            if t.type == tokenize.OP and t.string in "([{":
                depth += 1
            elif t.type == tokenize.OP and t.string in ")]}":
                depth -= 1
            elif depth == 0 and (t.type in (tokenize.NEWLINE, tokenize.COMMENT, tokenize.ENDMARKER)
                                 or t.string == ";"):
                break
            if t.type not in skip:
                last = t
            j += 1
        args = tokens[i + 1:j]
        if args and args[0].string == ">>":
            raise ValueError(f"line {tok.start[0]}: print >>file has no plain print() spelling")
        if last is not tok and last.string == ",":
            raise ValueError(f"line {tok.start[0]}: print with a trailing comma has no plain print() spelling")
        if last is tok:
            edits.append((offset(tok.end), offset(tok.end), "()"))
            continue
        first = next(t for t in args if t.type not in skip)
        if first.string == "(" and _closing(tokens, tokens.index(first)) is last:
            continue  # print(x): already a call
        edits.append((offset(last.end), offset(last.end), ")"))
        edits.append((offset(tok.end), offset(first.start), "("))
    out = source
    for start, end, text in sorted(edits, reverse=True):
        out = out[:start] + text + out[end:]
    return out


def _closing(tokens, i):
    depth = 0
    for t in tokens[i:]:
        if t.type == tokenize.OP and t.string in "([{":
            depth += 1
        elif t.type == tokenize.OP and t.string in ")]}":
            depth -= 1
            if depth == 0:
                return t
    return None


def test_py2to3_changes_print_and_xrange_only():
    src = textwrap.dedent("""\
        from __future__ import division
        def f(p, i):
            print 'dropping', p  # a comment
            for k in xrange(0, 3): print k
            print
            print '>>>', p, \\
                    (i + 1)
            if p: print(p)
            x = [xrange(2)]; print x
        """)
    out = py2to3(src)
    assert out == textwrap.dedent("""\
        from __future__ import division
        def f(p, i):
            print('dropping', p)  # a comment
            for k in range(0, 3): print(k)
            print()
            print('>>>', p, \\
                    (i + 1))
            if p: print(p)
            x = [range(2)]; print(x)
        """)
    compile(out, "<converted>", "exec")
    with pytest.raises(ValueError):
        py2to3("print >>f, x\n")
    with pytest.raises(ValueError):
        py2to3("print x,\n")


# ------------------------------------------------------------------ running scripts in the wrapper


@pytest.fixture
def fcn(tmp_path):
    """tmp_path holding the fcn scripts (converted), where scripts and drivers run."""
    folder = shared_path("models", "fcn")
    for name in SCRIPTS:
        src = (folder / name).read_text()
        (tmp_path / name).write_text(py2to3(src))
    return tmp_path


def run_wrapped(cwd, script, *args):
    """`python -m caffeish.pycaffe.compat script args` in cwd; the completed process (must succeed)."""
    proc = wrapped(cwd, script, *args)
    assert proc.returncode == 0, f"{script} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------ surgery.py


CLASSIFIER = """\
name: "classifier"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc6" type: "InnerProduct" bottom: "conv1" top: "fc6"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 }
                        bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.2 }
                        bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "aux" type: "InnerProduct" bottom: "fc6" top: "aux"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.2 } } }
"""

FULLY_CONV = """\
name: "fcn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc6" type: "Convolution" bottom: "conv1" top: "fc6"
  convolution_param { num_output: 5 kernel_size: 6 } }
layer { name: "fc7" type: "Convolution" bottom: "fc6" top: "fc7"
  convolution_param { num_output: 3 kernel_size: 1 bias_term: false } }
layer { name: "upscore" type: "Deconvolution" bottom: "fc7" top: "upscore"
  convolution_param { num_output: 3 kernel_size: 4 stride: 2 weight_filler { type: "gaussian" std: 1 } } }
"""

TRANSPLANT_DRIVER = """\
import sys
import numpy as np
import caffe
import surgery

src_proto, src_weights, dst_proto, out = sys.argv[1:]
net = caffe.Net(src_proto, src_weights, caffe.TEST)
new_net = caffe.Net(dst_proto, caffe.TEST)
surgery.transplant(new_net, net)
arrays = {}
for name in new_net.params:
    for i, p in enumerate(new_net.params[name]):
        arrays['%s_%d' % (name, i)] = np.array(p.data)
x = np.random.RandomState(0).uniform(-1, 1, net.blobs['data'].data.shape).astype(np.float32)
arrays['fc7_classifier'] = np.array(net.forward(data=x)['fc7'])
arrays['fc7_fcn'] = np.array(new_net.forward(blobs=['fc7'], data=x)['fc7'])
np.savez(out, **arrays)
"""


def test_surgery_transplant_copies_coerces_and_drops(fcn):
    src, dst = write(fcn / "classifier.prototxt", CLASSIFIER), write(fcn / "fcn.prototxt", FULLY_CONV)
    classifier = caffeish.Net(str(src), seed=3)
    weights = fcn / "classifier.caffemodel"
    classifier.save(str(weights))
    write(fcn / "transplant.py", TRANSPLANT_DRIVER)
    proc = run_wrapped(fcn, "transplant.py", src, weights, dst, fcn / "out.npz")
    assert proc.stdout.splitlines() == [
        "copying conv1  ->  conv1 0",
        "copying conv1  ->  conv1 1",
        "coercing fc6 0 from (5, 144) to (5, 4, 6, 6)",
        "copying fc6  ->  fc6 1",
        "coercing fc7 0 from (3, 5) to (3, 5, 1, 1)",
        "dropping fc7 1",
        "dropping aux",
    ]
    out = np.load(fcn / "out.npz")
    model = {name: arrays for name, arrays in cio.read_caffemodel(str(weights)).arrays().items()}
    # Every copied parameter is the source's, element for element, in the destination's shape.
    np.testing.assert_array_equal(out["conv1_0"], model["conv1"][0])
    np.testing.assert_array_equal(out["conv1_1"], model["conv1"][1])
    np.testing.assert_array_equal(out["fc6_0"], model["fc6"][0].reshape(5, 4, 6, 6))
    np.testing.assert_array_equal(out["fc6_1"], model["fc6"][1])
    np.testing.assert_array_equal(out["fc7_0"], model["fc7"][0].reshape(3, 5, 1, 1))
    # A layer the source lacks keeps its filler's values (the same seed gives the same ones).
    fresh = caffeish.Net(str(dst))
    np.testing.assert_array_equal(out["upscore_0"], fresh.params["upscore"][0].data)
    # The fully convolutional net now computes the classifier (fc7 without its bias).
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    expected = _classifier_numpy(x, model) - model["fc7"][1]
    np.testing.assert_allclose(out["fc7_classifier"], expected + model["fc7"][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["fc7_fcn"].reshape(2, 3), expected, rtol=1e-4, atol=1e-5)


def _conv_numpy(x, w, b=None, pad=0):
    """Direct 2-D convolution (stride 1), N x C x H x W."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1), dtype=np.float64)
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, :, dy:dy + out.shape[2], dx:dx + out.shape[3]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def _classifier_numpy(x, model):
    conv1 = np.maximum(_conv_numpy(x.astype(np.float64), model["conv1"][0], model["conv1"][1]), 0)
    fc6 = conv1.reshape(len(x), -1) @ model["fc6"][0].T + model["fc6"][1]
    return fc6 @ model["fc7"][0].T + model["fc7"][1]


UPSAMPLE = """\
name: "upsample"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 5 dim: 6 } } }
layer { name: "up_dense" type: "Deconvolution" bottom: "data" top: "up_dense"
  convolution_param { num_output: 3 kernel_size: 4 stride: 2 pad: 1 bias_term: false } }
layer { name: "up_group" type: "Deconvolution" bottom: "data" top: "up_group"
  convolution_param { num_output: 3 group: 3 kernel_size: 3 stride: 2 pad: 1 bias_term: false } }
layer { name: "keep" type: "Deconvolution" bottom: "data" top: "keep"
  convolution_param { num_output: 3 kernel_size: 2 stride: 2 bias_term: false
                      weight_filler { type: "gaussian" std: 1 } } }
"""

INTERP_DRIVER = """\
import sys
import numpy as np
import caffe
import surgery

proto, out = sys.argv[1:]
net = caffe.Net(proto, caffe.TEST)
before = {k: np.array(net.params[k][0].data) for k in net.params}
interp_layers = [k for k in net.params.keys() if 'up' in k]
surgery.interp(net, interp_layers)
outs = net.forward(blobs=['up_dense', 'up_group'], data=np.ones(net.blobs['data'].data.shape, np.float32))
np.savez(out, layers=np.array(interp_layers), up_dense_out=np.array(outs['up_dense']),
         up_group_out=np.array(outs['up_group']),
         **dict(('%s_before' % k, v) for k, v in before.items()),
         **dict(('%s_after' % k, np.array(net.params[k][0].data)) for k in net.params))
"""


def _bilinear_numpy(k):
    """Caffe's bilinear filler (README's formula): f = ceil(k/2), c = (k-1)/(2f)."""
    f = int(np.ceil(k / 2.0))
    c = (k - 1) / (2.0 * f)
    pos = np.arange(k) / f
    line = 1 - np.abs(pos - c)
    return np.outer(line, line)


def test_surgery_interp_writes_bilinear_kernels(fcn):
    proto = write(fcn / "upsample.prototxt", UPSAMPLE)
    write(fcn / "interp.py", INTERP_DRIVER)
    run_wrapped(fcn, "interp.py", proto, fcn / "out.npz")
    out = np.load(fcn / "out.npz")
    assert list(out["layers"]) == ["up_dense", "up_group"]
    # Dense (3 x 3 slots, zeros from the default filler, as in FCN's nets): the kernel on the
    # diagonal, the other slots untouched.
    before, after = out["up_dense_before"], out["up_dense_after"]
    for i in range(3):
        for j in range(3):
            want = _bilinear_numpy(4) if i == j else before[i, j]
            np.testing.assert_allclose(after[i, j], want, rtol=1e-6, atol=1e-7)
    # Grouped (3 x 1): every channel gets the (odd) kernel.
    for i in range(3):
        np.testing.assert_allclose(out["up_group_after"][i, 0], _bilinear_numpy(3), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["keep_after"], out["keep_before"])  # not named 'up*'
    # Bilinear x2 upsampling of a constant image is that constant away from the border.
    assert out["up_dense_out"].shape == (1, 3, 10, 12) and out["up_group_out"].shape == (1, 3, 9, 11)
    np.testing.assert_allclose(out["up_dense_out"][:, :, 1:-1, 1:-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["up_group_out"][:, :, 1:-1, 1:-1], 1.0, rtol=1e-6)


# ------------------------------------------------------------------ score.py with VOCSegDataLayer


SEG_NET = """\
name: "seg"
layer { name: "data" type: "Python" top: "data" top: "label"
  python_param { module: "voc_layers" layer: "VOCSegDataLayer"
    param_str: "{'voc_dir': 'VOC', 'split': 'seg11valid', 'mean': (104.00698793, 116.66876762, 122.67891434), 'seed': 1337}" } }
layer { name: "score" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.02 }
                      bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 normalize: false } }
"""

SCORE_DRIVER = """\
import json
import sys
import numpy as np
import caffe
import score

proto, out = sys.argv[1:]
ids = [l.strip() for l in open('VOC/ImageSets/Segmentation/seg11valid.txt')]
net = caffe.Net(proto, caffe.TEST)
hist = score.do_seg_tests(net, 4000, 'seg_{}', ids, layer='score')
hist2, loss2 = score.compute_hist(net, False, ids)   # a second pass over the same images
a = np.array([0, 1, 1, 2, 255, 3]); b = np.array([0, 1, 2, 2, 1, 3])
np.savez(out, hist=hist, hist2=hist2, loss2=loss2, fast=score.fast_hist(a, b, 3),
         w=np.array(net.params['score'][0].data), b=np.array(net.params['score'][1].data))
"""


def _voc_folder(root, rng):
    """A PASCAL VOC-like folder: JPEGImages/*.jpg, SegmentationClass/*.png (4 classes and 255)."""
    ids = ["2007_000033", "2007_000042", "2007_000061"]
    sizes = [(7, 9), (6, 5), (8, 8)]
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for name, (h, w) in zip(ids, sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = rng.integers(0, 4, (h, w)).astype(np.uint8)
        label[0, :2] = 255  # void pixels: ignored by the loss and the histogram
        Image.fromarray(label, mode="L").save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "seg11valid.txt").write_text("\n".join(ids) + "\n")
    return ids


def _scores_numpy(root, name, w, b):
    """voc_layers' input (BGR, minus the mean, C x H x W) through the 1x1 score layer."""
    im = np.array(Image.open(root / "JPEGImages" / f"{name}.jpg"), dtype=np.float64)[:, :, ::-1] - np.array(MEAN)
    return np.einsum("hwc,oc->ohw", im, w[:, :, 0, 0]) + b.reshape(-1, 1, 1)


def test_score_seg_tests_on_a_voc_data_layer(fcn):
    rng = np.random.default_rng(5)
    ids = _voc_folder(fcn / "VOC", rng)
    proto = write(fcn / "val.prototxt", SEG_NET)
    write(fcn / "seg.py", SCORE_DRIVER)
    proc = run_wrapped(fcn, "seg.py", proto, fcn / "out.npz")
    out = np.load(fcn / "out.npz")
    w, b = out["w"].astype(np.float64), out["b"].astype(np.float64)
    n = 4
    hist = np.zeros((n, n))
    loss = 0.0
    for name in ids:
        label = np.array(Image.open(fcn / "VOC" / "SegmentationClass" / f"{name}.png")).astype(int)
        scores = _scores_numpy(fcn / "VOC", name, w, b)
        pred = scores.argmax(0)
        valid = label < n
        np.add.at(hist, (label[valid], pred[valid]), 1)
        # SoftmaxWithLoss, normalize: false: the sum over valid pixels of -log p(label), over the batch (1).
        z = scores - scores.max(0)
        logp = z - np.log(np.exp(z).sum(0))
        loss += -logp[label[valid], np.nonzero(valid)[0], np.nonzero(valid)[1]].sum()
        # compute_hist's picture of each prediction (save_format 'seg_{}' with iteration 4000).  Only
        # its size is checked: Pillow versions write a palette-less mode-P image differently
        # (Pillow 13 maps every index above 1 to 1), whatever runs the net.
        with Image.open(fcn / "seg_4000" / f"{name}.png") as saved:
            assert (saved.mode, saved.size) == ("P", pred.shape[::-1])
    loss /= len(ids)
    np.testing.assert_array_equal(out["hist"], hist)
    np.testing.assert_array_equal(out["hist2"], hist)
    np.testing.assert_allclose(out["loss2"], loss, rtol=1e-4)
    np.testing.assert_array_equal(out["fast"], [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    # The printed scores: loss, overall and mean accuracy, mean IU, frequency-weighted IU.
    printed = {}
    for line in proc.stdout.splitlines():
        m = re.match(r">>> \S+ \S+ Iteration 4000 (loss|overall accuracy|mean accuracy|mean IU|fwavacc) (\S+)$", line)
        if m:
            printed[m.group(1)] = float(m.group(2))
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
        freq = hist.sum(1) / hist.sum()
        expected = {
            "loss": loss,
            "overall accuracy": np.diag(hist).sum() / hist.sum(),
            "mean accuracy": np.nanmean(np.diag(hist) / hist.sum(1)),
            "mean IU": np.nanmean(iu),
            "fwavacc": (freq[freq > 0] * iu[freq > 0]).sum(),
        }
    assert set(printed) == set(expected), proc.stdout
    for key, value in expected.items():
        np.testing.assert_allclose(printed[key], value, rtol=1e-4, err_msg=key)


# ------------------------------------------------------------------ infer.py and vis.py


DEPLOY = """\
name: "tiny-fcn"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 500 dim: 500 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.01 }
                      bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "score" type: "Convolution" bottom: "conv1" top: "score"
  convolution_param { num_output: 21 kernel_size: 1 weight_filler { type: "gaussian" std: 1 }
                      bias_filler { type: "gaussian" std: 0.1 } } }
"""


def _voc_palette(n):
    """PASCAL VOC's colour map: the bits of the class index spread over R, G and B, high bits first."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        for bit in range(8):
            for channel in range(3):
                if (k >> (3 * bit + channel)) & 1:
                    palette[k, channel] += 1 << (7 - bit)
    return palette


def test_infer_segments_the_demo_image(fcn):
    # infer.py's own layout: demo/image.jpg, voc-fcn8s/deploy.prototxt and its caffemodel.
    rng = np.random.default_rng(11)
    (fcn / "demo").mkdir()
    (fcn / "voc-fcn8s").mkdir()
    Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)).save(fcn / "demo" / "image.jpg", quality=95)
    deploy = write(fcn / "voc-fcn8s" / "deploy.prototxt", DEPLOY)
    weights = fcn / "voc-fcn8s" / "fcn8s-heavy-pascal.caffemodel"
    caffeish.Net(str(deploy), seed=7).save(str(weights))
    run_wrapped(fcn, "infer.py")
    model = cio.read_caffemodel(str(weights)).arrays()
    im = np.array(Image.open(fcn / "demo" / "image.jpg"))
    x = (im.astype(np.float32)[:, :, ::-1] - np.array(MEAN)).astype(np.float32).transpose(2, 0, 1)[None]
    conv1 = np.maximum(_conv_numpy(x.astype(np.float64), model["conv1"][0], model["conv1"][1], pad=1), 0)
    score = _conv_numpy(conv1, model["score"][0], model["score"][1])
    seg = score[0].argmax(0)
    assert len(np.unique(seg)) > 3  # a real test of the argmax, not one class everywhere
    palette = _voc_palette(21)
    output = np.array(Image.open(fcn / "demo" / "output.png"))
    np.testing.assert_array_equal(output, palette[seg])
    # vis_seg: half image, half colour where the class is not background, saved as JPEG by Pillow:
    # the same pixels through the same encoder give the same file's pixels.
    blend = im.astype(np.float32)
    mask = seg > 0
    blend[mask] = blend[mask] * 0.5 + 0.5 * palette[seg[mask]]
    encoded = io.BytesIO()
    Image.fromarray(blend.astype(np.uint8)).save(encoded, format="JPEG")
    vis = np.array(Image.open(fcn / "demo" / "visualization.jpg"))
    np.testing.assert_array_equal(vis, np.array(Image.open(encoded)))


def test_vis_palette_is_pascal_voc(fcn):
    script = write(fcn / "palette.py", """\
        import json, sys
        import vis
        json.dump(vis.make_palette(256).tolist(), open(sys.argv[1], 'w'))
        """)
    run_wrapped(fcn, script.name, fcn / "palette.json")
    palette = np.array(json.loads((fcn / "palette.json").read_text()))
    np.testing.assert_array_equal(palette, _voc_palette(256))
    assert palette[15].tolist() == [192, 128, 128]  # person


# ------------------------------------------------------------------ solve.py's pattern: training


SOLVE_NET = """\
name: "{name}"
layer {{ name: "data" type: "Python" top: "data" top: "label"
  python_param {{ module: "voc_layers" layer: "VOCSegDataLayer"
    param_str: "{{'voc_dir': 'VOC', 'split': '{split}', 'mean': (104.00698793, 116.66876762, 122.67891434), 'seed': 1337}}" }} }}
layer {{ name: "score_fr" type: "Convolution" bottom: "data" top: "score_fr"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "gaussian" std: 0.002 }} }} }}
layer {{ name: "upscore" type: "Deconvolution" bottom: "score_fr" top: "upscore" param {{ lr_mult: 0 }}
  convolution_param {{ num_output: 4 kernel_size: 4 stride: 2 bias_term: false }} }}
layer {{ name: "score" type: "Crop" bottom: "upscore" bottom: "data" top: "score" crop_param {{ axis: 2 offset: 1 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param {{ ignore_label: 255 normalize: false }} }}
"""

SOLVE_SOLVER = """\
train_net: "train.prototxt"
test_net: "val.prototxt"
test_iter: 3
# make test net, but don't invoke it from the solver itself
test_interval: 999999999
display: 4
average_loss: 4
lr_policy: "fixed"
base_lr: 1e-6
momentum: 0.9
iter_size: 1
max_iter: 100000
weight_decay: 0.0005
snapshot: 8
snapshot_prefix: "snapshot/train"
test_initialization: false
"""

# voc-fcn8s/solve.py's calls, in its order, with 2 rounds of 8 steps instead of 25 of 4000.
SOLVE_DRIVER = """\
import caffe
import surgery, score

import numpy as np
import os
import sys

weights = 'init.caffemodel'

# init
caffe.set_device(0)
caffe.set_mode_gpu()

solver = caffe.SGDSolver('solver.prototxt')
solver.net.copy_from(weights)

# surgeries
interp_layers = [k for k in solver.net.params.keys() if 'up' in k]
surgery.interp(solver.net, interp_layers)

# scoring
val = np.loadtxt('VOC/ImageSets/Segmentation/seg11valid.txt', dtype=str)

before = np.array(solver.net.params['score_fr'][0].data)
for _ in range(2):
    solver.step(8)
    score.seg_tests(solver, False, val, layer='score')
np.savez('out.npz', before=before, w=np.array(solver.net.params['score_fr'][0].data),
         b=np.array(solver.net.params['score_fr'][1].data), up=np.array(solver.net.params['upscore'][0].data),
         test_w=np.array(solver.test_nets[0].params['score_fr'][0].data), iter=solver.iter)
"""


def test_solve_pattern_trains_and_scores(fcn):
    """fcn.berkeleyvision.org's solve.py pattern: SGDSolver, copy_from, surgery.interp, step and
    score.seg_tests (which shares the trained weights with the test net) on VOCSegDataLayer."""
    rng = np.random.default_rng(7)
    ids = _voc_folder(fcn / "VOC", rng)
    (fcn / "VOC" / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    write(fcn / "train.prototxt", SOLVE_NET.format(name="train", split="train"))
    write(fcn / "val.prototxt", SOLVE_NET.format(name="val", split="seg11valid"))
    write(fcn / "solver.prototxt", SOLVE_SOLVER)
    (fcn / "snapshot").mkdir()
    # The initial weights, from the same net with an Input layer for the data (voc_layers is the
    # script's own module, imported in its process only).
    init_net = SOLVE_NET.format(name="init", split="train").split("\n")
    start = next(i for i, line in enumerate(init_net) if "score_fr" in line)
    init_net = ['layer { name: "data" type: "Input" top: "data" top: "label" input_param { shape { dim: 1 '
                'dim: 3 dim: 8 dim: 8 } shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }'] + init_net[start:]
    write(fcn / "init.prototxt", "\n".join(init_net))
    init = caffeish.Net(str(fcn / "init.prototxt"), caffeish.TEST, seed=3)
    init.save(str(fcn / "init.caffemodel"))
    write(fcn / "solve.py", SOLVE_DRIVER)
    proc = run_wrapped(fcn, "solve.py")
    out = np.load(fcn / "out.npz")
    assert int(out["iter"]) == 16
    assert not np.array_equal(out["w"], out["before"]), "training moved score_fr"
    np.testing.assert_array_equal(out["test_w"], out["w"])  # seg_tests shared the train net's weights
    filt = np.array([0.25, 0.75, 0.75, 0.25])  # interp's bilinear kernel on the diagonal, kept by lr_mult 0
    for i in range(4):
        np.testing.assert_allclose(out["up"][i, i], np.outer(filt, filt), rtol=1e-6)
    assert not out["up"][0, 1].any()
    assert sorted(p.name for p in (fcn / "snapshot").iterdir()) == [
        "train_iter_16.caffemodel", "train_iter_16.solverstate", "train_iter_8.caffemodel", "train_iter_8.solverstate"]
    for it in (8, 16):
        assert re.search(rf">>> \S+ \S+ Iteration {it} overall accuracy \S+", proc.stdout), proc.stdout
    printed = float(re.findall(r"Iteration 16 overall accuracy (\S+)", proc.stdout)[0])
    assert 0 <= printed <= 1
    assert "Iteration 8 (" in proc.stderr and "Iteration 8, lr = 1e-06" in proc.stderr  # Caffe's log lines
