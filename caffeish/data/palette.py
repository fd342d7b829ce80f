"""Colors for segmentation pictures: palettes, palette PNGs, overlays and legends.

Palettes:
  * "pascal": the PASCAL VOC palette (class i's color spreads the bits of i
    over the high bits of R, G and B; 0 is black, 1 dark red, 15 a light pink,
    255 the void color), the colors of VOC's SegmentationClass PNGs and FCN's demo;
  * a DIGITS color-map text file: one "R G B [name]" line per class (0..255,
    spaces or commas), the format DIGITS' segmentation datasets use (`palette.txt`);
  * a dataset folder built by `caffeish dataset`: its `palette.txt`, and its
    `labels.txt` as the class names.

Pictures: `label_image` is a mode P PNG of class indices (what VOC's ground
truth looks like: viewers show colors, programs read indices);
`overlay_image` blends the photo with the class colors; `legend` lists the
classes present with their color, name and share of the pixels.
"""
import functools
import os

import numpy as np

from caffeish.errors import CaffeishError, ShapeError


def pascal_palette(n=256):
    """The PASCAL VOC palette: (n, 3) uint8, class i's bits spread over R, G, B from the high bit."""
    idx = np.arange(n)
    colors = np.zeros((n, 3), dtype=np.int64)
    c = idx.copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            colors[:, channel] |= ((c >> channel) & 1) << shift
        c >>= 3
    return colors.astype(np.uint8)


def pad_with_pascal(colors, n):
    """(n, 3) uint8: `colors` (None, or up to n of them) first, PASCAL VOC's colours for the classes past them."""
    base = pascal_palette(n)
    if colors is not None:
        colors = np.asarray(colors, dtype=np.uint8)[:n]
        base[:len(colors)] = colors
    return base


def is_pascal(spec):
    """Whether a palette spec names the PASCAL VOC palette: None (the default), 'pascal' or 'voc'."""
    return spec is None or (isinstance(spec, (str, os.PathLike)) and os.fspath(spec).lower() in ("pascal", "voc"))


def read_colormap(path, option="--palette", unique=True):
    """A DIGITS color-map text file -> ((N, 3) uint8 colors, names or None).

    Line i is class i: "R G B [name]" (values 0..255, spaces or commas; '#'
    starts a comment).  With `unique`, two classes with one color are refused:
    a label image in that color could not be mapped back to a class (colors
    that are only shown may repeat).  `option` names the option the file came
    from in errors.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of line 1
            lines = f.read().splitlines()
    except OSError as e:
        raise CaffeishError(f"{option} {path}: cannot read the color map: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CaffeishError(f"{option} {path}: not a UTF-8 text file (one 'R G B [name]' line per class)") from None
    colors, names = [], []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].replace(",", " ").strip()
        if not text:
            continue
        parts = text.split()
        try:
            rgb = [int(v) for v in parts[:3]]
        except ValueError:
            rgb = []
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise CaffeishError(f"{path}:{n}: expected 'R G B [name]' with values 0..255, got '{line.strip()}'")
        colors.append(rgb)
        names.append(" ".join(parts[3:]))
    if not colors:
        raise CaffeishError(f"{option} {path}: the color map has no 'R G B' lines")
    colors = np.array(colors, dtype=np.uint8)
    keys = pack_rgb(colors)
    if unique and len(np.unique(keys)) != len(keys):
        dup = [int(k) for k in keys if (keys == k).sum() > 1][0]
        classes = [i for i, k in enumerate(keys) if k == dup]
        raise CaffeishError(f"{option} {path}: classes {classes} share the color {tuple(int(v) for v in colors[classes[0]])}")
    return colors, (names if any(names) else None)


def pack_rgb(rgb):
    """(..., 3) uint8 colors -> (...) int32 keys R<<16 | G<<8 | B."""
    rgb = np.asarray(rgb).astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def write_colormap(path, colors, inputs=()):
    """Write (N, 3) colors as a DIGITS color-map text file, atomically."""
    from caffeish.formats import io

    text = "".join(f"{r} {g} {b}\n" for r, g, b in np.asarray(colors, dtype=np.int64))
    with io.atomic_output(path, inputs) as f:
        f.write(text.encode())


def read_labels(path, option="--labels"):
    """Class names, one per line (DIGITS labels.txt, Caffe's synset_words.txt); line i is class i,
    so blank lines inside are kept and only trailing blanks are dropped."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = [line.strip() for line in f.read().splitlines()]
    except OSError as e:
        raise CaffeishError(f"{option} {path}: cannot read the labels file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CaffeishError(f"{option} {path}: not a UTF-8 text file (one class name per line)") from None
    while names and not names[-1]:
        names.pop()
    return names


def load_palette(spec="pascal"):
    """(colors (N, 3) uint8, class names or None) for 'pascal', a color-map file or a dataset folder."""
    if is_pascal(spec):
        return pascal_palette(), None
    path = os.fspath(spec)
    if os.path.isdir(path):
        palette_file = os.path.join(path, "palette.txt")
        if not os.path.isfile(palette_file):
            raise CaffeishError(f"{path}: a dataset folder with no palette.txt (is it a segmentation dataset?)")
        labels_file = os.path.join(path, "labels.txt")
        colors, names = read_colormap(palette_file, unique=False)
        return colors, read_labels(labels_file) if os.path.isfile(labels_file) else names
    if not os.path.exists(path):
        raise CaffeishError(f"--palette {spec}: not 'pascal', a color-map file or a dataset folder")
    return read_colormap(path, unique=False)


def colors_for(colors, n_classes, source="the palette"):
    """The first n_classes colors; an error when the palette has fewer."""
    colors = np.asarray(colors, dtype=np.uint8)
    if len(colors) < n_classes:
        raise ShapeError(f"{source} has {len(colors)} colors but the net scores {n_classes} classes")
    return colors[:n_classes]


# ---------------------------------------------------------------------------- pictures


def label_image(classes, colors):
    """A mode P image of the class indices (H x W ints < 256) with `colors` as its palette."""
    from PIL import Image

    classes = np.asarray(classes)
    if classes.size and (classes.min() < 0 or classes.max() > 255):
        raise ShapeError("a palette PNG holds class indices 0..255; "
                         f"these run from {classes.min()} to {classes.max()}")
    classes = np.ascontiguousarray(classes, dtype=np.uint8)
    img = Image.frombytes("P", (classes.shape[1], classes.shape[0]), classes.tobytes())
    table = np.zeros((256, 3), dtype=np.uint8)
    colors = np.asarray(colors, dtype=np.uint8)[:256]
    table[: len(colors)] = colors
    img.putpalette(table.ravel().tolist())
    return img


def blend(image, classes, colors, alpha=0.6):
    """(1 - alpha) * image + alpha * color of each pixel's class: H x W x 3 uint8."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, np.newaxis], 3, axis=2)
    if image.shape[:2] != np.shape(classes):
        raise ShapeError(f"image of size {image.shape[:2]} and classes of size {np.shape(classes)} differ")
    if not 0 <= alpha <= 1:
        raise CaffeishError(f"overlay opacity must be between 0 and 1, got {alpha}")
    painted = np.asarray(colors, dtype=np.float32)[np.asarray(classes)]
    out = image[:, :, :3].astype(np.float32) * np.float32(1 - alpha) + painted * np.float32(alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def legend(classes, colors, labels=None, height=None):
    """A white RGB panel listing the classes present: swatch, 'index name' and pixel share.

    Classes are listed by index; `height` makes the panel at least that tall.
    """
    from PIL import Image, ImageDraw

    classes = np.asarray(classes)
    counts = np.bincount(classes.ravel(), minlength=len(colors))
    present = np.flatnonzero(counts)
    total = max(classes.size, 1)
    font = _font()
    entries = []
    for c in present:
        name = labels[c] if labels is not None and c < len(labels) and labels[c] else f"class {c}"
        entries.append((int(c), f"{c} {name}  {100.0 * counts[c] / total:.1f}%"))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for _, text in entries] or [(0, 0, 0, 10)]
    line_h = max(14, max(b[3] - b[1] for b in boxes) + 4)
    swatch, pad = line_h - 4, 6
    width = pad * 3 + swatch + max(b[2] - b[0] for b in boxes)
    panel_h = max(pad * 2 + line_h * len(entries), height or 0)
    panel = Image.new("RGB", (width, panel_h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (c, text) in enumerate(entries):
        y = pad + i * line_h
        color = tuple(int(v) for v in colors[c])
        draw.rectangle([pad, y + 1, pad + swatch, y + 1 + swatch], fill=color, outline=(0, 0, 0))
        draw.text((pad * 2 + swatch, y), text, fill=(0, 0, 0), font=font)
    return panel


def overlay_image(image, classes, colors, alpha=0.6, labels=None, with_legend=False):
    """The photo blended with the class colors (mode RGB); with_legend appends the legend on the right."""
    from PIL import Image

    over = Image.fromarray(blend(image, classes, colors, alpha))  # H x W x 3 uint8: RGB
    if not with_legend:
        return over
    panel = legend(classes, colors, labels, height=over.height)
    out = Image.new("RGB", (over.width + panel.width, max(over.height, panel.height)), (255, 255, 255))
    out.paste(over, (0, 0))
    out.paste(panel, (over.width, 0))
    return out
