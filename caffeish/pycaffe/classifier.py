"""pycaffe's `caffe.Classifier`: a Net that classifies H x W x K images.

    net = caffe.Classifier('deploy.prototxt', 'weights.caffemodel',
                           image_dims=(256, 256), mean=np.array([104, 117, 123]),
                           raw_scale=255, channel_swap=(2, 1, 0))
    probs = net.predict([caffe.io.load_image('cat.jpg')])          # N x classes

Same arguments, preprocessing and results as pycaffe's classifier.py:
  * the constructor builds the net at TEST and a Transformer for the first
    input (transpose H x W x K -> K x H x W, then channel swap, raw scale,
    mean, input scale, each only when given);
  * `predict` resizes every image to `image_dims` (default: the input blob's
    H x W), takes ten crops of the input's size (4 corners, centre, and their
    mirrors; `oversample=True`) or the centre crop, runs them through the net
    in batches of the input's batch size (`forward_all`) and returns the first
    output, averaged over the ten crops when oversampling.
Differences: `pretrained_file` may be None (every parameter from its filler);
the centre crop's corners are whole numbers (pycaffe 1.0 floors them too).
"""
import numpy as np

from caffeish.errors import CaffeishError, ShapeError
from caffeish.formats.schema import TEST
from caffeish.graph.geometry import center_crop_offsets
from caffeish.pycaffe.transformer import Transformer, oversample as _oversample, resize_image
from caffeish.runtime.net import Net

__all__ = ["Classifier"]


def make_transformer(net, what, mean=None, input_scale=None, raw_scale=None, channel_swap=None):
    """pycaffe's Transformer for the net's first input, as Classifier and Detector (`what`) configure it."""
    if not net.inputs:
        raise CaffeishError(f"net '{net.name}' has no input blob to feed images to (add an Input layer)")
    in_ = net.inputs[0]
    shape = net.blobs[in_].data.shape
    if len(shape) != 4:
        raise ShapeError(f"{what} needs an N x K x H x W input; '{in_}' has shape {shape}")
    transformer = Transformer({in_: shape})
    transformer.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(in_, mean)
    if input_scale is not None:
        transformer.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(in_, channel_swap)
    return transformer


class Classifier(Net):
    """Net for image classification by scaling, centre cropping or oversampling (pycaffe's Classifier)."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        """image_dims: (H, W) the images are resized to before cropping (default: the input's H x W).

        mean, input_scale, raw_scale, channel_swap: the Transformer's settings for the first input.
        """
        Net.__init__(self, model_file, pretrained_file, TEST)
        self.transformer = make_transformer(self, "Classifier", mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample=True):
        """Class probabilities (N x C) of an iterable of H x W x K images.

        oversample: average over the centre, corner and mirrored crops (default);
        False: the centre crop only.
        """
        inputs = [np.asarray(im) for im in inputs]
        if not inputs:
            raise CaffeishError("Classifier.predict: no images given")
        bad = [i for i, im in enumerate(inputs) if im.ndim != 3]
        if bad:
            raise ShapeError(f"Classifier.predict takes H x W x K images; image {bad[0]} has shape "
                             f"{inputs[bad[0]].shape}")
        dims = tuple(int(d) for d in self.image_dims)
        crop_dims = tuple(int(d) for d in self.crop_dims)
        if dims[0] < crop_dims[0] or dims[1] < crop_dims[1]:
            raise ShapeError(f"image_dims {dims} are smaller than the net's input {crop_dims}")
        # Scale every image to image_dims.
        resized = np.zeros((len(inputs), dims[0], dims[1], inputs[0].shape[2]), dtype=np.float32)
        for ix, im in enumerate(inputs):
            resized[ix] = resize_image(im, dims)
        if oversample:
            crops = _oversample(resized, crop_dims)
        else:
            # Centre crop: pycaffe's int(centre -/+ half the crop) is geometry's floor((H - crop_h) / 2).
            y0, x0 = center_crop_offsets(dims, crop_dims)
            crops = resized[:, y0:y0 + crop_dims[0], x0:x0 + crop_dims[1], :]
        in_ = self.inputs[0]
        caffe_in = np.zeros((crops.shape[0], crops.shape[3]) + crops.shape[1:3], dtype=np.float32)
        for ix, crop in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(in_, crop)
        out = self.forward_all(**{in_: caffe_in})
        predictions = np.asarray(out[self.outputs[0]])
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
