"""A caffeish Net's graph run in PyTorch eager (torch.nn.functional), for the benchmarks.

    from torch_graph import TorchNet
    tnet = TorchNet(net, device="cuda")            # forward only (gpu_check.py)
    tnet = TorchNet(net, device="cpu", grad=True)  # training (train_step.py)
    outputs = tnet(x)  or  tnet(data=x, label=y)   # {output blob: tensor}
    outputs["loss"].backward(); tnet.grads()       # {layer: [grad tensor or None, ...]}

The benchmarks' one source of truth for "the same net in PyTorch": it walks
net.nodes (the graph caffeish runs, Splits included) and maps each layer to the
torch.nn.functional call that computes the same thing, with the geometry the
caffeish layer worked out (node.layer.geometry, crop offsets).  Parameters are
the Net's own arrays, shared, not copied, where PyTorch can alias them (numpy
arrays on "cpu", CuPy arrays on "cuda"; dtype=torch.float64 copies them, for
a float64 reference); with grad=True those whose ParamSpec
lr_mult is not 0 are leaf tensors with requires_grad (Caffe computes no diff
for an lr_mult 0 parameter, e.g. FCN's fixed bilinear deconvolutions).

Training pieces: Dropout follows the Net's phase (TRAIN: F.dropout with the
layer's ratio, so the mask differs from caffeish's; TEST: identity), and
SoftmaxWithLoss is F.cross_entropy over axis 1 (per position, so that Caffe's
clamp of each position's loss at -log(FLT_MIN) = 87.3 applies to the value, not
the gradient, as in Caffe) with Caffe's normalisation (VALID, the default: the
sum over the positions whose label is not ignore_label, divided by their count;
FULL, BATCH_SIZE, NONE) times the layer's loss_weight.  An in-place ReLU
(top named as its bottom) runs in place when nothing else holds the tensor,
as a PyTorch model written by hand would (nn.ReLU(inplace=True)).

PyTorch is a benchmark-only dependency: the library and the tests never import this.
"""
import numpy as np

SUPPORTED = {"Input", "Convolution", "Deconvolution", "ReLU", "Pooling", "LRN", "Dropout", "InnerProduct",
             "Softmax", "Crop", "Eltwise", "Concat", "Split", "Power", "SoftmaxWithLoss"}


CAP = float(-np.log(np.float64(np.finfo(np.float32).tiny)))  # -log(FLT_MIN): Caffe's largest loss per position


def _lr_mult(node, j):
    specs = node.param.param
    return specs[j].lr_mult if j < len(specs) else 1.0


class TorchNet:
    """The same graph in PyTorch, with the caffeish Net's weight arrays (shared where possible)."""

    SUPPORTED = SUPPORTED

    def __init__(self, net, device="cuda", grad=False, train=None, dtype=None, inplace=True):
        import torch

        from caffeish.formats.schema import TRAIN

        self.torch = torch
        self.net = net
        self.device = torch.device(device)
        self.dtype = torch.float32 if dtype is None else dtype  # float64: a reference for float32 results
        self.inplace = inplace  # in-place ReLU where safe (False: every layer makes a new tensor)
        self.tops = None
        self.train = (net.phase == TRAIN) if train is None else bool(train)
        for node in net.nodes:
            if node.type not in self.SUPPORTED:
                raise NotImplementedError(f"no PyTorch equivalent here for layer type {node.type}")
        self.params = {}
        for node in net.nodes:
            arrays = net._params.get(node.name)
            if not arrays:
                continue
            tensors = []
            for j, a in enumerate(arrays):
                t = self._tensor(a)
                if grad and _lr_mult(node, j) != 0:
                    t.requires_grad_(True)
                tensors.append(t)
            self.params[node.name] = tensors

    def _tensor(self, array):
        torch = self.torch
        if isinstance(array, np.ndarray):
            array = np.ascontiguousarray(array, dtype=np.float32)
            t = torch.from_numpy(array)  # shares the Net's memory
        else:
            t = torch.as_tensor(array, device=self.device)  # a CuPy array: shared through __cuda_array_interface__
        return t.to(self.device, self.dtype)  # no copy when device and dtype are already right

    def parameters(self):
        return [t for ts in self.params.values() for t in ts if t.requires_grad]

    def zero_grad(self):
        """Drop the gradients (optimizer.zero_grad(set_to_none=True))."""
        for t in self.parameters():
            t.grad = None

    def grads(self):
        return {name: [t.grad for t in ts] for name, ts in self.params.items()}

    def _input(self, value):
        torch = self.torch
        if isinstance(value, torch.Tensor):
            return value.to(self.device, self.dtype)
        return self._tensor(value)

    def __call__(self, *args, retain=False, **inputs):
        """Run the graph on the inputs (the first input positionally, or all by name): {output: tensor}.
        retain=True keeps each layer's top tensors in self.tops ({layer: [tensor, ...]}; to inspect
        intermediate gradients, build with inplace=False)."""
        torch = self.torch
        F = torch.nn.functional
        if args:
            if len(args) != 1:
                raise TypeError("TorchNet(x): one positional input (the net's first), or inputs by name")
            inputs[self.net.input_names[0]] = args[0]
        blobs = {name: self._input(v) for name, v in inputs.items()}
        given = {id(t) for t in blobs.values()}
        kept = {} if retain else None
        for node in self.net.nodes:
            t, p = node.type, node.param
            if t == "Input":
                continue
            bottoms = [blobs[b] for b in node.bottoms]
            w = self.params.get(node.name, [])
            if t in ("Convolution", "Deconvolution"):
                g = node.layer.geometry
                cp = p.convolution_param
                fn = F.conv2d if t == "Convolution" else F.conv_transpose2d
                kwargs = {"stride": g.stride, "padding": g.pad, "dilation": g.dilation, "groups": cp.group}
                tops = [fn(bottoms[0], w[0], w[1] if cp.bias_term else None, **kwargs)]
            elif t == "ReLU":
                x = bottoms[0]
                # In place (Caffe's top == bottom) when no other blob, input or view holds the tensor.
                inplace = (self.inplace and node.tops[0] == node.bottoms[0] and id(x) not in given and x._base is None
                           and sum(v is x for v in blobs.values()) == 1)
                slope = p.relu_param.negative_slope
                tops = [F.leaky_relu(x, slope, inplace=inplace) if slope else F.relu(x, inplace=inplace)]
            elif t == "Pooling":
                g = node.layer.geometry
                pp = p.pooling_param
                if pp.pool == pp.MAX:
                    tops = [F.max_pool2d(bottoms[0], g.kernel, g.stride, g.pad, ceil_mode=g.ceil)]
                else:
                    tops = [F.avg_pool2d(bottoms[0], g.kernel, g.stride, g.pad, ceil_mode=g.ceil)]
            elif t == "LRN":
                lp = p.lrn_param
                tops = [F.local_response_norm(bottoms[0], lp.local_size, lp.alpha, lp.beta, lp.k)]
            elif t == "Dropout":
                ratio = p.dropout_param.dropout_ratio
                tops = [F.dropout(bottoms[0], ratio, training=True) if self.train else bottoms[0]]
            elif t == "Power":
                pw = p.power_param
                out = bottoms[0]
                if pw.scale != 1:
                    out = out * pw.scale
                if pw.shift != 0:
                    out = out + pw.shift
                if pw.power != 1:
                    out = out ** pw.power
                tops = [out]
            elif t == "InnerProduct":
                tops = [F.linear(bottoms[0].flatten(1), w[0], w[1] if len(w) > 1 else None)]
            elif t == "Softmax":
                tops = [F.softmax(bottoms[0], dim=p.softmax_param.axis)]
            elif t == "SoftmaxWithLoss":
                tops = [self._softmax_loss(node, *bottoms)]
            elif t == "Crop":
                lay = node.layer
                tops = [bottoms[0][tuple(slice(o, o + n) for o, n in zip(lay.offsets, lay.top_shape))]]
            elif t == "Eltwise":
                ep = p.eltwise_param
                if ep.operation == ep.SUM:
                    coeff = list(ep.coeff) or [1.0] * len(bottoms)
                    out = bottoms[0] * coeff[0] if coeff[0] != 1 else bottoms[0]
                    for b, c in zip(bottoms[1:], coeff[1:]):
                        out = out + (b * c if c != 1 else b)
                elif ep.operation == ep.PROD:
                    out = bottoms[0]
                    for b in bottoms[1:]:
                        out = out * b
                else:
                    out = bottoms[0]
                    for b in bottoms[1:]:
                        out = torch.maximum(out, b)
                tops = [out]
            elif t == "Concat":
                tops = [torch.cat(bottoms, dim=p.concat_param.axis)]
            else:  # Split
                tops = [bottoms[0]] * len(node.tops)
            for name, top in zip(node.tops, tops):
                blobs[name] = top
            if retain:
                kept[node.name] = tops
        self.tops = kept
        return {name: blobs[name] for name in self.net.outputs}

    def _softmax_loss(self, node, scores, labels):
        """Caffe's SoftmaxWithLoss (softmax over axis 1) as F.cross_entropy, Caffe's normalisation."""
        torch = self.torch
        F = torch.nn.functional
        lp = node.param.loss_param
        if node.param.softmax_param.axis != 1 or len(node.tops) != 1:
            raise NotImplementedError(f"layer '{node.name}': SoftmaxWithLoss here is axis 1, one top")
        target = labels.reshape(scores.shape[0], *scores.shape[2:]).long()  # int(label): truncation
        ignore = lp.ignore_label if lp.HasField("ignore_label") else -100
        if lp.HasField("normalization"):
            mode = lp.normalization
        elif lp.HasField("normalize"):
            mode = lp.VALID if lp.normalize else lp.BATCH_SIZE
        else:
            mode = lp.VALID
        # Per position -log p[label] (0 where ignored).  Caffe clamps p at FLT_MIN (the loss of a position is
        # at most -log(FLT_MIN) = 87.3) but its gradient is p - onehot regardless: the clamp changes the value
        # only, so it is applied to a detached difference.
        nll = F.cross_entropy(scores, target, ignore_index=ignore, reduction="none")
        nll = nll + (nll.clamp(max=CAP) - nll).detach()
        if mode == lp.VALID:
            n = int((target != ignore).sum()) if lp.HasField("ignore_label") else target.numel()
        else:
            n = {lp.FULL: target.numel(), lp.BATCH_SIZE: scores.shape[0]}.get(mode, 1)
        loss = nll.sum() / max(1, n)
        weights = node.param.loss_weight
        if len(weights) and weights[0] != 1:
            loss = loss * weights[0]
        return loss
