"""Net surgery into files: the `caffeish surgery` operations with their outputs written all or nothing.

`convolutionalize_files`, `transplant_file`, `bilinear_file` and `fcn_files`
run the operations of caffeish.apps.surgery and caffeish.apps.surgery_fcn and
write their nets and weights.  Every output path is checked against every input
and against the other outputs before anything is computed (an output inside an
input folder, such as fcn's dataset, is refused too); missing folders of the
outputs are created, as `segment -o` creates its folder (and removed again if
the run fails); the files are then staged
as temporary files beside their destinations, all written and synced, and only
then renamed into place one after the other (`write_all`), so a refused or
failed run leaves no new file behind.  (Only a rename itself failing after an
earlier one, which a full disk cannot cause, would leave the earlier files in
place.)
"""
import os

from caffeish.apps import surgery
from caffeish.apps.surgery_fcn import build_fcn, default_train_val_path
from caffeish.data import dataset_meta
from caffeish.errors import CaffeishError
from caffeish.formats import io, wire

_same_file = io.same_file


def check_outputs(outputs, inputs=()):
    """io.check_outputs with missing folders allowed (write_all creates them): an output that is an input,
    inside an input folder, a folder, under a file, ... is refused."""
    io.check_outputs(outputs, inputs, create_folders=True)


def output_paths(outputs, weights_given, what):
    """(OUT.prototxt, OUT.caffemodel or None) from -o's one or two paths.

    The caffemodel defaults to OUT's name with .caffemodel when weights were
    given (`what` names them in the error when a caffemodel is asked without)."""
    outs = list(outputs)
    if len(outs) > 2:
        raise CaffeishError(f"-o takes OUT.prototxt and optionally OUT.caffemodel, got {len(outs)} paths")
    proto = outs[0]
    if len(outs) == 2:
        if not weights_given:
            raise CaffeishError(f"-o names a caffemodel, but no {what} caffemodel was given to convert")
        return proto, outs[1]
    if weights_given:
        stem = proto[:-len(".prototxt")] if proto.endswith(".prototxt") else proto
        return proto, stem + ".caffemodel"
    return proto, None


def _inputs(*paths):
    return [p for p in paths if p]


def prototxt_file(path, net):
    """(path, bytes chunks) of a text NetParameter, for write_all."""
    return path, [io.format_prototxt(net).encode("utf-8")]


def caffemodel_file(path, net, blobs):
    """(path, bytes chunks) of a binary NetParameter with its blobs, for write_all."""
    chunks = io.model_chunks(net, blobs)
    total = wire.chunks_size(chunks)
    if total > io.MAX_BINARY_BYTES:
        raise CaffeishError(f"{path}: the model would be {total} bytes, over Caffe's 2 GB limit")
    return path, chunks


def write_all(files, inputs):
    """Write [(path, chunks)] all or nothing: checked first, each staged as a temp file beside its
    destination, every temp written and synced, and only then all renamed into place (io.atomic_outputs).
    A failure while writing (a chunk generator raising, a full disk) leaves no destination touched and
    removes the temps; only a rename failing after an earlier one succeeded leaves the earlier files."""
    paths = [path for path, _ in files]
    check_outputs(paths, inputs)
    created = io.make_folders(paths)
    try:
        with io.atomic_outputs(paths, inputs) as outs:
            for f, (_, chunks) in zip(outs, files):
                for c in chunks:
                    f.write(c)
    except BaseException:
        io.remove_empty_folders(created)
        raise


def convolutionalize_files(net, weights, proto_out, model_out=None, input_shapes=None, verify=True, seed=0):
    """surgery.convolutionalize written to proto_out (and model_out, with weights); returns its Report."""
    inputs = _inputs(net, weights)
    check_outputs([proto_out, model_out], inputs)
    out, blobs, rep = surgery.convolutionalize(net, weights, input_shapes=input_shapes, verify=verify, seed=seed)
    files = [prototxt_file(proto_out, out)]
    if model_out:
        files.append(caffemodel_file(model_out, out, blobs))
    write_all(files, inputs)
    return rep


def transplant_file(src_net, src_weights, dst_net, output, mapping=None, allow_partial=False, input_shapes=None,
                    seed=0):
    """surgery.transplant written to the caffemodel `output`; returns its Report."""
    inputs = _inputs(src_net, src_weights, dst_net)
    check_outputs([output], inputs)
    net, blobs, rep = surgery.transplant(src_net, src_weights, dst_net, mapping=mapping,
                                         allow_partial=allow_partial, input_shapes=input_shapes, seed=seed)
    write_all([caffemodel_file(output, net, blobs)], inputs)
    return rep


def bilinear_file(net, weights, output, layers=None, form="auto", input_shapes=None):
    """surgery.bilinear written to the caffemodel `output`; returns its Report."""
    inputs = _inputs(net, weights)
    check_outputs([output], inputs)
    out, blobs, rep = surgery.bilinear(net, weights, layers=layers, form=form, input_shapes=input_shapes)
    write_all([caffemodel_file(output, out, blobs)], inputs)
    return rep


def fcn_files(net, weights, proto_out, model_out=None, train_val_out=None, dataset=None, **options):
    """build_fcn written as the deploy net proto_out, the train/val net train_val_out (default: beside
    proto_out, see default_train_val_path) and, with weights, model_out; returns (FCN, train_val_out).

    options: build_fcn's (classes, skips, pad, mean_file, random_weights, ...); dataset: the folder the
    train/val net reads, checked first and never written into (so is a mean_file)."""
    train_val_out = train_val_out or default_train_val_path(proto_out)
    if _same_file(train_val_out, proto_out):
        raise CaffeishError(f"the train/val net would overwrite the deploy net '{proto_out}'; give --train-val "
                            "(nothing was written)")
    inputs = _inputs(net, weights)
    folder = os.path.abspath(dataset) if dataset else None
    if folder:
        dataset_meta.check_folder(dataset)
    mean = options.get("mean_file")
    if mean not in (None, "auto"):
        io.read_binaryproto(mean)  # a mean file the train/val net can use (one line when it is not)
        options["mean_file"] = os.path.abspath(mean)
        inputs.append(mean)
    check_outputs([proto_out, train_val_out, model_out], inputs + ([("--dataset", dataset)] if folder else []))
    fcn = build_fcn(net, weights, dataset=folder, **options)
    files = [prototxt_file(proto_out, fcn.deploy), prototxt_file(train_val_out, fcn.train_val)]
    if model_out:
        files.append(caffemodel_file(model_out, fcn.deploy, fcn.blobs))
    write_all(files, inputs)
    return fcn, train_val_out
