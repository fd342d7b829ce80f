"""The web app's pictures: the net as an SVG (Graphviz's dot through pydot, as caffe.draw), plots as
PNG (matplotlib's object API, one Figure per picture, no pyplot state), thumbnails (Pillow).

`net_svg(rows, link)` draws the summary's rows (caffeish.apps.summary): layers are boxes, blobs are
the edges (labelled with name and shape), in-place layers (ReLU, Dropout...) are folded into the box
of the layer whose top they rewrite, Caffe's inserted Splits are hidden (their consumers read the
split blob), and every box links to its layer's page.  Names from the net reach DOT escaped
(`_q`) and the SVG as Graphviz writes text (XML-escaped).
"""
import io as pyio
import threading

import numpy as np

from caffeish.apps.summary import BIAS_BLOB, fmt_shape
from caffeish.formats.io import printable
from caffeish.pycaffe import draw

_plot_lock = threading.Lock()  # matplotlib's font cache and Agg are shared: one figure at a time


def _q(*lines):
    """A DOT string of one or more lines: quoted, backslashes and quotes escaped, control characters
    as \\xNN (io.printable), lines joined with DOT's line break."""
    return '"' + r"\n".join(printable(str(t)).replace("\\", "\\\\").replace('"', '\\"') for t in lines) + '"'


def _geometry(row):
    p = row.get("param")
    if p is None:
        return ""
    if row["type"] in ("Convolution", "Deconvolution"):
        cp = p.convolution_param
        k = cp.kernel_size[0] if len(cp.kernel_size) else (cp.kernel_h or 1)
        s = cp.stride[0] if len(cp.stride) else (cp.stride_h or 1)
        pad = cp.pad[0] if len(cp.pad) else cp.pad_h
        return f"{cp.num_output} x {k}x{k} /{s} pad {pad}"
    if row["type"] == "Pooling":
        pp = p.pooling_param
        method = draw.get_pooling_types_dict().get(pp.pool, str(pp.pool))
        return f"{method} {pp.kernel_size or pp.kernel_h}x{pp.kernel_size or pp.kernel_w} /{pp.stride or pp.stride_h}"
    if row["type"] == "InnerProduct":
        return f"{p.inner_product_param.num_output} outputs"
    return ""


def layer_boxes(rows):
    """(boxes, edges, inputs, outputs): boxes {id: [row index, ...]} (a layer and the in-place layers
    folded into it), edges [(source id, box id, blob)], the blobs no layer made (net inputs) and the
    blobs no layer reads (outputs), with Splits hidden."""
    alias, producer, boxes, edges, inputs, read = {}, {}, {}, [], [], set()
    for i, r in enumerate(rows):
        bottoms = [alias.get(b, b) for b in r["bottoms"]]
        if r["type"] == "Split" and bottoms:
            for t in r["tops"]:
                alias[t] = bottoms[0]
            continue
        tops = [alias.get(t, t) for t in r["tops"]]
        if len(bottoms) == 1 and tops == bottoms and bottoms[0] in producer:
            boxes[producer[bottoms[0]]].append(i)  # in place: folded into the box that made the blob
            continue
        box = f"L{i}"
        boxes[box] = [i]
        for b in bottoms:
            if b not in producer:
                producer[b] = f"B{len(inputs)}"
                inputs.append(b)
            edges.append((producer[b], box, b))
            read.add(b)
        for t in tops:
            producer[t] = box
    outputs = [b for b, box in producer.items() if b not in read and box.startswith("L")]
    return boxes, edges, inputs, [(b, producer[b]) for b in outputs]


def _blob_shapes(rows):
    shapes = {}
    for r in rows:
        if isinstance(r.get("top_shapes"), list):
            for t, s in zip(r["tops"], r["top_shapes"]):
                shapes[t] = fmt_shape(s)
    return shapes


def net_dot(rows, link, name="net"):
    """The pydot graph of the summary's rows; link(row index) is a box's URL."""
    pydot = draw._pydot()
    boxes, edges, inputs, outputs = layer_boxes(rows)
    shapes = _blob_shapes(rows)
    g = pydot.Dot(_q(name), graph_type="digraph", rankdir="TB", bgcolor="transparent", nodesep="0.25",
                  ranksep="0.3")
    g.set_node_defaults(fontname="Helvetica", fontsize="10")
    g.set_edge_defaults(fontname="Helvetica", fontsize="8", color="#555555", fontcolor="#333333")
    for k, blob in enumerate(inputs):
        g.add_node(pydot.Node(f"B{k}", label=_q(blob, shapes.get(blob, "")), shape="ellipse",
                              style="filled", fillcolor="#E0E0E0", id=_q(f"input-{k}")))
    for box, members in boxes.items():
        head = rows[members[0]]
        lines = [f"{head['name']} ({head['type']})"]
        geometry = _geometry(head)
        if geometry:
            lines.append(geometry)
        lines += [f"+ {rows[m]['name']} ({rows[m]['type']})" for m in members[1:]]
        g.add_node(pydot.Node(box, label=_q(*lines), shape="box", style='"filled,rounded"',
                              fillcolor=_q(draw.choose_color_by_layertype(head["type"])),
                              URL=_q(link(members[0])), target="_top", id=_q(f"layer-{members[0]}"),
                              tooltip=_q(f"{head['name']}: {head['type']}")))
    for src, dst, blob in edges:
        g.add_edge(pydot.Edge(src, dst, label=_q(f"{blob} {shapes.get(blob, '')}")))
    for k, (blob, box) in enumerate(outputs):
        g.add_node(pydot.Node(f"O{k}", label=_q(blob, shapes.get(blob, "")), shape="ellipse",
                              style="dashed"))
        g.add_edge(pydot.Edge(box, f"O{k}"))
    return g


def net_svg(rows, link, name="net"):
    """The net as SVG text (Graphviz's dot); DrawDependencyError when pydot or dot is missing."""
    svg = draw.render(net_dot(rows, link, name), "svg").decode("utf-8")
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


# ---------------------------------------------------------------------------- plots


def _figure(w, h):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100)


def _png(fig):
    buf = pyio.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def blob_kinds(layer_type, arrays):
    """[(label, array)]: the weights and the bias (summary's BIAS_BLOB rule) of one layer."""
    bias = BIAS_BLOB.get(layer_type)
    out = []
    for i, a in enumerate(arrays):
        label = "biases" if i == bias else ("weights" if i == 0 else f"blob {i}")
        out.append((label, np.asarray(a)))
    return out


def stats(a):
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max()), "zeros": float(np.count_nonzero(a == 0) / a.size)}


MAX_SAMPLES = 1 << 21  # a histogram of a 100M-value fc6 from every 48th value looks the same


def histogram_png(title, kinds):
    """Histograms of a layer's blobs (weights and biases side by side)."""
    with _plot_lock:
        fig = _figure(2.6 * max(1, len(kinds)), 1.9)
        for k, (label, a) in enumerate(kinds):
            ax = fig.add_subplot(1, max(1, len(kinds)), k + 1)
            flat = a.ravel()
            if flat.size > MAX_SAMPLES:
                flat = flat[:: flat.size // MAX_SAMPLES + 1]
            flat = flat[np.isfinite(flat)]
            ax.hist(flat, bins=50, color="#4C72B0" if label == "weights" else "#DD8452")
            ax.set_title(f"{printable(title)}: {label}", fontsize=8)
            ax.tick_params(labelsize=6)
        return _png(fig)


def filter_mosaic(w, limit=256):
    """(H x W x 3 float in 0..1): the first `limit` filters of an out x in x kh x kw blob, each scaled to
    its own range, BGR inputs shown as RGB (Caffe's nets take BGR), other counts by their first channel."""
    w = np.asarray(w, dtype=np.float32)[:limit]
    n, c, kh, kw = w.shape
    tiles = w[:, ::-1][:, :3] if c == 3 else w[:, :1].repeat(3, axis=1)
    lo = tiles.reshape(n, -1).min(axis=1)[:, None, None, None]
    hi = tiles.reshape(n, -1).max(axis=1)[:, None, None, None]
    tiles = (tiles - lo) / np.maximum(hi - lo, 1e-12)
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    out = np.ones((rows * (kh + 1) + 1, cols * (kw + 1) + 1, 3), np.float32)
    for i in range(n):
        r, c0 = divmod(i, cols)
        out[1 + r * (kh + 1):1 + r * (kh + 1) + kh, 1 + c0 * (kw + 1):1 + c0 * (kw + 1) + kw] = tiles[i].transpose(1, 2, 0)
    return out


def filters_png(title, w):
    mosaic = filter_mosaic(w)
    with _plot_lock:
        side = min(8.0, max(2.5, mosaic.shape[1] / 20))
        fig = _figure(side, side * mosaic.shape[0] / mosaic.shape[1] + 0.3)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(mosaic, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{printable(title)}: {min(len(w), 256)} filters {w.shape[2]}x{w.shape[3]}", fontsize=8)
        return _png(fig)


def distribution_png(names, counts, colors, title="pixels per class"):
    """A bar chart of class counts, each bar in its class colour."""
    with _plot_lock:
        n = len(counts)
        fig = _figure(min(12.0, 1.5 + 0.35 * n), 2.6)
        ax = fig.add_subplot(1, 1, 1)
        total = max(1, int(sum(counts)))
        ax.bar(range(n), [100.0 * c / total for c in counts],
               color=[tuple(int(v) / 255 for v in colors[i]) for i in range(n)], edgecolor="#333333")
        ax.set_xticks(range(n))
        ax.set_xticklabels([printable(s)[:20] for s in names], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("% of pixels", fontsize=8)
        ax.set_title(title, fontsize=9)
        return _png(fig)


def thumbnail_png(blob, limit=16, size=64):
    """A mosaic of the first `limit` channels of a 1 x C x H x W blob (each scaled to its range); a 1-D blob
    (N x C) as a row of bars."""
    from PIL import Image

    a = np.asarray(blob, dtype=np.float32)
    a = a[0] if a.ndim >= 2 else a[np.newaxis]
    if a.ndim == 1:
        a = a[np.newaxis, np.newaxis, :]
    elif a.ndim == 2:
        a = a[:, np.newaxis, :] if a.shape[1] > 1 else a[np.newaxis]
    a = a.reshape(a.shape[0], a.shape[-2], a.shape[-1])[:limit]
    lo = a.reshape(len(a), -1).min(axis=1)[:, None, None]
    hi = a.reshape(len(a), -1).max(axis=1)[:, None, None]
    a = ((a - lo) / np.maximum(hi - lo, 1e-12) * 255).astype(np.uint8)
    cols = int(np.ceil(np.sqrt(len(a))))
    tiles = [Image.fromarray(t).resize((size, max(1, round(size * t.shape[0] / max(t.shape[1], 1)))),
                                       Image.NEAREST) for t in a]
    th = max(t.height for t in tiles)
    out = Image.new("L", (cols * (size + 2), -(-len(tiles) // cols) * (th + 2)), 255)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out.paste(t, (c * (size + 2), r * (th + 2)))
    buf = pyio.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def png(img):
    """A Pillow image as PNG bytes."""
    buf = pyio.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
