"""A small synthetic SYNTHIA-like street world: scenes, label images and classifier crops.

Every scene is drawn from a seed (numpy's default_rng), so the same seed gives the same files
byte for byte.  A scene is a W x H RGB street view (default 128x96):

* sky (class 0): a vertical gradient of a random palette (day, overcast, dusk), soft clouds;
* road (1): a perspective trapezoid from a vanishing point on the horizon, asphalt texture,
  dashed centre line and edge lines in perspective;
* building (2): a skyline of rectangles of varied heights, colours and window grids, whose
  facades run down to the road's edges (the street canyon of SYNTHIA's city);
* car (3): boxes with a cabin, glass, wheels and lights, sized by their depth, on the road;
* pedestrian (4): thin figures (head, torso, arms, legs) beside or on the road;

then a random brightness, colour cast and sensor noise.  Labels are palette PNGs (index = class;
SYNTHIA's colours).  `write_crops` cuts square patches from other scenes, labelled by their
centre pixel's class, balanced over the classes, one subfolder per class (`0_sky`, `1_road`, ...):
the layout `caffeish dataset classification` reads.

    python world.py --out DIR [--scenes 200] [--val-scenes 50] [--crops-per-class 400] [--seed 0]

writes DIR/train/{images,labels}, DIR/val/{images,labels}, DIR/crops/<k>_<class>/ and
DIR/classes.txt.  Scene i is drawn from default_rng([seed, i]) (val scenes follow the train
scenes' numbers), crop scene j from default_rng([seed, 1000000 + j]): the three sets never share
a scene.
"""
import argparse
import os

import numpy as np
from PIL import Image

CLASSES = ("sky", "road", "building", "car", "pedestrian")
# SYNTHIA's colours for these classes
PALETTE = ((128, 128, 128), (128, 64, 128), (128, 0, 0), (64, 0, 128), (64, 64, 0))
SKY, ROAD, BUILDING, CAR, PEDESTRIAN = range(5)

SKY_PALETTES = (  # (top, horizon) colours
    ((40, 90, 200), (150, 190, 240)),     # clear day
    ((70, 120, 210), (200, 215, 235)),    # hazy day
    ((110, 115, 125), (185, 185, 190)),   # overcast
    ((60, 40, 110), (240, 150, 90)),      # dusk
    ((20, 30, 70), (90, 80, 120)),        # night-ish
)
FACADES = ((150, 150, 150), (190, 180, 160), (160, 80, 60), (120, 110, 100), (200, 200, 190),
           (90, 100, 120), (170, 150, 110), (110, 130, 150), (210, 190, 170), (70, 70, 75))


def _uniform_color(rng, base, spread):
    return np.clip(np.asarray(base, np.float32) + rng.uniform(-spread, spread, 3), 0, 255)


def _sky(rng, img, lab, horizon):
    h, w = lab.shape
    top, bottom = SKY_PALETTES[rng.integers(len(SKY_PALETTES))]
    top, bottom = _uniform_color(rng, top, 25), _uniform_color(rng, bottom, 25)
    t = np.clip(np.arange(h, dtype=np.float32) / max(horizon, 1), 0, 1)[:, None, None]
    img[:] = top * (1 - t) + bottom * t
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(rng.integers(0, 4)):  # soft clouds
        cx, cy = rng.uniform(0, w), rng.uniform(0, horizon * 0.8)
        rx, ry = rng.uniform(8, 25), rng.uniform(3, 7)
        a = np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))[..., None] * rng.uniform(0.3, 0.7)
        img[:] = img * (1 - a) + 235 * a
    lab[:] = SKY


def _buildings(rng, img, lab, horizon):
    h, w = lab.shape
    x = -rng.integers(0, 12)
    while x < w:
        bw = int(rng.integers(10, 36))
        top = int(rng.integers(3, max(4, horizon - 5)))
        x0, x1 = max(x, 0), min(x + bw, w)
        color = _uniform_color(rng, FACADES[rng.integers(len(FACADES))], 20)
        block = np.empty((h - top, x1 - x0, 3), np.float32)
        block[:] = color
        # window grid
        px, py = int(rng.integers(4, 8)), int(rng.integers(5, 9))
        wx, wy = int(rng.integers(2, px)), int(rng.integers(2, py))
        ox, oy = int(rng.integers(0, px)), int(rng.integers(0, py))
        lit = rng.uniform() < 0.3
        glass = _uniform_color(rng, (230, 210, 120) if lit else (50, 60, 80), 20)
        ys = (np.arange(top, h) + oy) % py < wy
        xs = (np.arange(x0, x1) + ox) % px < wx
        win = ys[:, None] & xs[None, :]
        block[win] = glass
        # facades below the horizon are side walls: a little darker
        below = np.arange(top, h) >= horizon
        block[below] *= 0.8
        img[top:, x0:x1] = block
        lab[top:, x0:x1] = BUILDING
        x += bw


def _road_edges(horizon, vx, top_half, bottom_half, h):
    """Left and right x of the road on each row (NaN above the horizon)."""
    rows = np.arange(h, dtype=np.float32)
    s = (rows - horizon) / max(h - horizon, 1)
    half = top_half + (bottom_half - top_half) * s
    left, right = vx - half, vx + half
    left[rows < horizon] = np.nan
    right[rows < horizon] = np.nan
    return left, right, s


def _road(rng, img, lab, horizon, vx):
    h, w = lab.shape
    top_half, bottom_half = rng.uniform(2, 8), rng.uniform(50, 110)
    left, right, s = _road_edges(horizon, vx, top_half, bottom_half, h)
    xx = np.arange(w, dtype=np.float32)[None, :]
    mask = (xx >= left[:, None]) & (xx <= right[:, None])
    mask[:horizon] = False
    gray = rng.uniform(55, 115)
    asphalt = gray + rng.normal(0, 6, (h, w)).astype(np.float32)
    tint = _uniform_color(rng, (0, 0, 0), 6)
    road = asphalt[..., None] + tint
    # dashed centre line and edge lines, in perspective
    depth = 1.0 / np.maximum(s, 1e-3)  # ~ distance
    line_half = 0.4 + 1.6 * s
    center = vx + rng.uniform(-0.15, 0.15) * (right - left)
    dashes = (np.floor(depth * rng.uniform(1.5, 3.0)) % 2) == 0
    paint = _uniform_color(rng, (235, 235, 225) if rng.uniform() < 0.7 else (230, 200, 60), 15)
    on_center = (np.abs(xx - center[:, None]) <= line_half[:, None]) & dashes[:, None]
    edge_in = 2 + 6 * s
    on_edges = ((np.abs(xx - (left + edge_in)[:, None]) <= line_half[:, None] * 0.7)
                | (np.abs(xx - (right - edge_in)[:, None]) <= line_half[:, None] * 0.7))
    marks = (on_center | (on_edges & (rng.uniform() < 0.6))) & mask
    road[marks] = paint
    img[mask] = road[mask]
    lab[mask] = ROAD
    return left, right, s


def _ellipse(shape, cx, cy, rx, ry):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((xx - cx) / max(rx, 0.5)) ** 2 + ((yy - cy) / max(ry, 0.5)) ** 2 <= 1


def _rect(shape, x0, y0, x1, y1):
    h, w = shape
    m = np.zeros(shape, bool)
    x0, x1 = int(np.rint(max(x0, 0))), int(np.rint(min(x1, w)))
    y0, y1 = int(np.rint(max(y0, 0))), int(np.rint(min(y1, h)))
    if x1 > x0 and y1 > y0:
        m[y0:y1, x0:x1] = True
    return m


def _car(rng, img, lab, cx, bottom, cw):
    shape = lab.shape
    ch = cw * rng.uniform(0.5, 0.7)
    if rng.uniform() < 0.35:
        body = _uniform_color(rng, [(30, 30, 30), (220, 220, 220), (130, 130, 135)][rng.integers(3)], 15)
    else:
        body = np.clip(rng.uniform(0, 1, 3) ** 0.8 * 230 + 15, 0, 255).astype(np.float32)
    glass = _uniform_color(rng, (45, 55, 70), 15)
    lower = _rect(shape, cx - cw / 2, bottom - ch * 0.62, cx + cw / 2, bottom - ch * 0.12)
    cab_w = cw * rng.uniform(0.55, 0.75)
    cabin = _rect(shape, cx - cab_w / 2, bottom - ch, cx + cab_w / 2, bottom - ch * 0.6)
    window = _rect(shape, cx - cab_w / 2 + cw * 0.05, bottom - ch * 0.93, cx + cab_w / 2 - cw * 0.05, bottom - ch * 0.62)
    r = ch * 0.17
    wheels = (_ellipse(shape, cx - cw * 0.32, bottom - r, r * 1.1, r)
              | _ellipse(shape, cx + cw * 0.32, bottom - r, r * 1.1, r))
    lights = (_rect(shape, cx - cw / 2, bottom - ch * 0.5, cx - cw / 2 + cw * 0.12, bottom - ch * 0.38)
              | _rect(shape, cx + cw / 2 - cw * 0.12, bottom - ch * 0.5, cx + cw / 2, bottom - ch * 0.38))
    shade = np.linspace(1.1, 0.8, shape[0], dtype=np.float32)[:, None, None]
    for mask, color in ((lower | cabin, body), (window, glass), (wheels, (20, 20, 20)),
                        (lights, (255, 60, 40) if rng.uniform() < 0.5 else (250, 240, 200))):
        img[mask] = (np.asarray(color, np.float32) * np.broadcast_to(shade, img.shape))[mask]
    lab[lower | cabin | window | wheels] = CAR


def _pedestrian(rng, img, lab, cx, bottom, ph):
    shape = lab.shape
    skin = _uniform_color(rng, [(230, 190, 160), (170, 120, 90), (100, 70, 50)][rng.integers(3)], 15)
    shirt = np.clip(rng.uniform(0, 255, 3), 0, 255).astype(np.float32)
    pants = _uniform_color(rng, [(40, 40, 60), (70, 70, 70), (120, 100, 80)][rng.integers(3)], 20)
    hr = ph * 0.09
    head = _ellipse(shape, cx, bottom - ph + hr, hr, hr * 1.1)
    tw = max(ph * 0.2, 1.2)
    torso = _rect(shape, cx - tw / 2, bottom - ph + 2 * hr, cx + tw / 2, bottom - ph * 0.45)
    arm_w = max(ph * 0.06, 0.8)
    arms = (_rect(shape, cx - tw / 2 - arm_w, bottom - ph + 2.2 * hr, cx - tw / 2, bottom - ph * 0.5)
            | _rect(shape, cx + tw / 2, bottom - ph + 2.2 * hr, cx + tw / 2 + arm_w, bottom - ph * 0.5))
    leg_w = max(ph * 0.075, 0.8)
    stride = ph * rng.uniform(0.0, 0.12)
    legs = (_rect(shape, cx - tw / 2 - stride / 2, bottom - ph * 0.45, cx - tw / 2 + leg_w - stride / 2, bottom)
            | _rect(shape, cx + tw / 2 - leg_w + stride / 2, bottom - ph * 0.45, cx + tw / 2 + stride / 2, bottom))
    for mask, color in ((torso | arms, shirt), (legs, pants), (head, skin)):
        img[mask] = color
    lab[head | torso | arms | legs] = PEDESTRIAN


def render_scene(rng, width=128, height=96):
    """One scene from a numpy Generator: (RGB uint8 HxWx3, labels uint8 HxW)."""
    img = np.zeros((height, width, 3), np.float32)
    lab = np.zeros((height, width), np.uint8)
    horizon = int(rng.uniform(0.32, 0.5) * height)
    vx = rng.uniform(0.3, 0.7) * width
    _sky(rng, img, lab, horizon)
    _buildings(rng, img, lab, horizon)
    left, right, _ = _road(rng, img, lab, horizon, vx)
    objects = []
    span = height - horizon
    for _ in range(rng.integers(0, 5)):  # cars: on the road
        bottom = rng.uniform(horizon + 0.12 * span, height + 0.05 * span)
        row = min(int(bottom), height - 1)
        depth = (bottom - horizon) / span
        cw = 5 + 50 * depth
        lo, hi = left[row] + cw * 0.3, right[row] - cw * 0.3
        if hi > lo:
            objects.append((bottom, "car", rng.uniform(lo, hi), cw))
    for _ in range(rng.integers(0, 5)):  # pedestrians: near the road's edges, some crossing
        bottom = rng.uniform(horizon + 0.1 * span, height + 0.02 * span)
        row = min(int(bottom), height - 1)
        depth = (bottom - horizon) / span
        ph = 7 + 40 * depth
        edge = left[row] if rng.uniform() < 0.5 else right[row]
        x = edge + rng.uniform(-0.25, 0.25) * (right[row] - left[row] + 10)
        objects.append((bottom, "ped", x, ph))
    objects.sort(key=lambda o: o[0])  # far to near
    for bottom, kind, x, size in objects:
        if kind == "car":
            _car(rng, img, lab, x, bottom, size)
        else:
            _pedestrian(rng, img, lab, x, bottom, size)
    # lighting and sensor noise
    img *= rng.uniform(0.65, 1.25) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), lab


def label_image(lab):
    """A palette PNG image of a label array (index = class)."""
    lab = np.ascontiguousarray(lab, np.uint8)
    im = Image.frombytes("P", (lab.shape[1], lab.shape[0]), lab.tobytes())
    flat = [c for rgb in PALETTE for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im


def write_scenes(folder, count, seed, width=128, height=96, start=0):
    """folder/images/scene_NNNNN.png and folder/labels/scene_NNNNN.png for `count` scenes."""
    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    counts = np.zeros(len(CLASSES), np.int64)
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        rgb, lab = render_scene(rng, width, height)
        name = f"scene_{i:05d}.png"
        Image.fromarray(rgb).save(os.path.join(images, name))
        label_image(lab).save(os.path.join(labels, name))
        counts += np.bincount(lab.ravel(), minlength=len(CLASSES))
    return counts


def write_crops(folder, per_class, seed, size=32, width=128, height=96, per_scene=6):
    """per_class crops of size x size per class, from scenes of their own seed, labelled by the
    centre pixel's class: folder/<k>_<class>/crop_NNNNN.png.  Returns the scenes used."""
    dirs = [os.path.join(folder, f"{k}_{name}") for k, name in enumerate(CLASSES)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    have = [0] * len(CLASSES)
    half = size // 2
    scene = 0
    while min(have) < per_class:
        rng = np.random.default_rng([seed, 1_000_000 + scene])
        rgb, lab = render_scene(rng, width, height)
        scene += 1
        inner = lab[half:height - size + half + 1, half:width - size + half + 1]
        for k in range(len(CLASSES)):
            ys, xs = np.nonzero(inner == k)
            if not len(ys) or have[k] >= per_class:
                continue
            for j in rng.choice(len(ys), size=min(per_scene, len(ys), per_class - have[k]), replace=False):
                y, x = ys[j], xs[j]  # top-left corner of a crop centred on (y + half, x + half)
                crop = rgb[y:y + size, x:x + size]
                Image.fromarray(crop).save(os.path.join(dirs[k], f"crop_{have[k]:05d}.png"))
                have[k] += 1
        if scene > 100 * per_class:
            raise RuntimeError("crops: a class is too rare in the scenes")
    return scene


def generate(out, train_scenes, val_scenes, crops_per_class, seed=0, crop_size=32, width=128, height=96):
    """The whole world under `out`: train/{images,labels}, val/{images,labels} (scenes of their own
    seeds), crops/<k>_<class>/ and classes.txt.  Returns a summary dict."""
    train = write_scenes(os.path.join(out, "train"), train_scenes, seed, width, height)
    val = write_scenes(os.path.join(out, "val"), val_scenes, seed, width, height, start=train_scenes)
    used = write_crops(os.path.join(out, "crops"), crops_per_class, seed, crop_size, width, height)
    with open(os.path.join(out, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASSES) + "\n")
    shares = (train + val) / max((train + val).sum(), 1)
    return {"train_scenes": train_scenes, "val_scenes": val_scenes, "size": [width, height],
            "crops_per_class": crops_per_class, "crop_size": crop_size, "crop_scenes": used,
            "pixel_shares": {name: round(float(v), 4) for name, v in zip(CLASSES, shares)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--scenes", type=int, default=200, help="training scenes")
    p.add_argument("--val-scenes", type=int, default=50)
    p.add_argument("--crops-per-class", type=int, default=400)
    p.add_argument("--crop-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = generate(args.out, args.scenes, args.val_scenes, args.crops_per_class, args.seed, args.crop_size)
    print("pixel shares: " + ", ".join(f"{n} {s:.1%}" for n, s in info["pixel_shares"].items()))
    print(f"crops: {args.crops_per_class} per class from {info['crop_scenes']} scenes")


if __name__ == "__main__":
    main()
