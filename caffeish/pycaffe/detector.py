"""pycaffe's `caffe.Detector`: windowed detection (R-CNN style) with a classifier net.

    det = caffe.Detector('deploy.prototxt', 'weights.caffemodel', mean=mean,
                         raw_scale=255, channel_swap=(2, 1, 0), context_pad=16)
    dets = det.detect_windows([('cat.jpg', [(0, 0, 100, 120), (40, 30, 200, 220)])])
    dets[0]['prediction'], dets[0]['window'], dets[0]['filename']

Same arguments and results as pycaffe's detector.py: windows are
(ymin, xmin, ymax, xmax) in pixels of the image loaded with caffe.io.load_image;
each is cropped (with `context_pad` pixels of context around it, scaled as
R-CNN does, the part outside the image filled with the mean), warped to the
input's H x W by the Transformer, and classified in batches of the input's
batch size.

`detect_selective_search` asks the proposals of the `selective_search_ijcv_with_python`
module (which runs MATLAB), as pycaffe does.  That module is imported only when
the method is called: without it (or without MATLAB) the method stops with an
UnsupportedError saying so; everything else works without it.
"""
import os

import numpy as np

from caffeish.errors import CaffeishError, ShapeError, UnsupportedError
from caffeish.formats.schema import TEST
from caffeish.pycaffe.classifier import make_transformer
from caffeish.pycaffe.transformer import load_image, resize_image
from caffeish.runtime.net import Net

__all__ = ["Detector"]

SELECTIVE_SEARCH_MODULE = "selective_search_ijcv_with_python"
SELECTIVE_SEARCH_URL = "https://github.com/sergeyk/selective_search_ijcv_with_python"


class Detector(Net):
    """Net for windowed detection over given windows or selective search proposals (pycaffe's Detector)."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        """mean, input_scale, raw_scale, channel_swap: the Transformer's settings for the first input.

        context_pad: pixels of context around each window, in the warped input (R-CNN's 16).
        """
        Net.__init__(self, model_file, pretrained_file, TEST)
        self.transformer = make_transformer(self, "Detector", mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """Classify windows of images: [(image filename, [window, ...]), ...] -> list of dicts.

        Each dict has 'window' (as given), 'prediction' (the first output's row for
        that window) and 'filename'.  Windows are (ymin, xmin, ymax, xmax).
        """
        images_windows = [(fname, list(windows)) for fname, windows in images_windows]
        window_inputs = []
        for image_fname, windows in images_windows:
            image = load_image(image_fname).astype(np.float32)
            for window in windows:
                window_inputs.append(self.crop(image, window))
        if not window_inputs:
            return []
        in_ = self.inputs[0]
        in_shape = self.blobs[in_].data.shape
        caffe_in = np.zeros((len(window_inputs), window_inputs[0].shape[2]) + tuple(in_shape[2:]),
                            dtype=np.float32)
        for ix, window_in in enumerate(window_inputs):
            caffe_in[ix] = self.transformer.preprocess(in_, window_in)
        out = self.forward_all(**{in_: caffe_in})
        predictions = np.asarray(out[self.outputs[0]])
        detections = []
        ix = 0
        for image_fname, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix], "filename": image_fname})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames):
        """detect_windows over the selective search proposals of each image (needs the module and MATLAB)."""
        try:
            import importlib

            selective_search = importlib.import_module(SELECTIVE_SEARCH_MODULE)
        except ImportError as e:
            raise UnsupportedError(
                f"detect_selective_search needs the '{SELECTIVE_SEARCH_MODULE}' module ({SELECTIVE_SEARCH_URL}, "
                f"which runs MATLAB) on the Python path, and it is not importable here ({e}); "
                f"give your own windows to detect_windows instead"
            ) from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]  # absolute, so that MATLAB finds them
        missing = [f for f in image_fnames if not os.path.isfile(f)]
        if missing:
            raise CaffeishError(f"{missing[0]}: no such image file")
        try:
            windows_list = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        except FileNotFoundError as e:
            if e.filename and os.path.basename(str(e.filename)) in ("matlab", "matlab.exe"):
                raise UnsupportedError(
                    f"detect_selective_search: '{SELECTIVE_SEARCH_MODULE}' runs MATLAB, which is not on "
                    f"the PATH here; give your own windows to detect_windows instead"
                ) from None
            raise
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im, window):
        """The H x W x K crop of `im` for `window` (ymin, xmin, ymax, xmax), with context when configured.

        Without context_pad: im[ymin:ymax, xmin:xmax].  With it: the window is
        grown so that, once warped to the input's size, it has context_pad
        pixels of context on each side; the grown box is clipped to the image,
        resized, and placed in a crop_dims canvas filled with the mean.
        """
        window = np.asarray(window)
        y0, x0, y1, x1 = (int(v) for v in window[:4])
        crop = im[y0:y1, x0:x1]
        if not self.context_pad:
            return crop
        box = window[:4].astype(np.float64)
        crop_size = self.blobs[self.inputs[0]].width  # the input is assumed square, as in pycaffe
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        # Grow the box around its centre by `scale`.
        half_h = (box[2] - box[0] + 1) / 2.0
        half_w = (box[3] - box[1] + 1) / 2.0
        center = (box[0] + half_h, box[1] + half_w)
        scaled_dims = scale * np.array((-half_h, -half_w, half_h, half_w))
        box = np.round(np.tile(center, 2) + scaled_dims)
        full_h = box[2] - box[0] + 1
        full_w = box[3] - box[1] + 1
        scale_h = crop_size / full_h
        scale_w = crop_size / full_w
        pad_y = int(round(max(0, -box[0]) * scale_h))  # the part above / left of the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        # Clip the box to the image and find its size in the warped crop.
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h = box[2] - box[0] + 1
        clip_w = box[3] - box[1] + 1
        if not (clip_h > 0 and clip_w > 0):
            raise ShapeError(f"window {tuple(window)} lies outside the image of shape {im.shape}")
        crop_h = int(round(clip_h * scale_h))
        crop_w = int(round(clip_w * scale_w))
        if pad_y + crop_h > crop_size:
            crop_h = crop_size - pad_y
        if pad_x + crop_w > crop_size:
            crop_w = crop_size - pad_x
        context_crop = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        context_crop = resize_image(context_crop, (crop_h, crop_w))
        crop = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        crop[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context_crop
        return crop

    def configure_crop(self, context_pad):
        """Set context_pad, the crop's H x W x K size, and (with context) the mean in image space."""
        in_ = self.inputs[0]
        tpose = self.transformer.transpose[in_]
        inv_tpose = [tpose[t] for t in tpose]
        self.crop_dims = np.array(self.blobs[in_].data.shape[1:])[inv_tpose]
        self.context_pad = context_pad
        if self.context_pad:
            channel_order = self.transformer.channel_swap.get(in_)
            raw_scale = self.transformer.raw_scale.get(in_)
            mean = self.transformer.mean.get(in_)
            if mean is not None:
                # The mean back in image space: untransposed, channels unswapped, divided by raw_scale.
                crop_mean = np.array(mean, dtype=np.float32).transpose(inv_tpose)
                if channel_order is not None:
                    channel_order = list(channel_order)
                    channel_order_inverse = [channel_order.index(i) for i in range(crop_mean.shape[2])]
                    crop_mean = crop_mean[:, :, channel_order_inverse]
                if raw_scale is not None:
                    crop_mean /= raw_scale
                self.crop_mean = crop_mean
            else:
                self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
