"""Binding stored weights to a net, by layer name, with Caffe's rules.

Caffe's CopyTrainedLayersFrom matches source layers to net layers by name;
source layers with no match are ignored and net layers missing from the source
keep their fillers.  For a matched layer the number of blobs must be equal and
each stored blob must fit the net's blob (`shape_equals`, which accepts the
legacy 4-D num/channels/height/width form left-padded with 1s).
"""
from caffeish.errors import WeightError


def shape_equals(record, target):
    """Caffe's Blob::ShapeEquals for a stored BlobRecord and a target shape."""
    target = tuple(target)
    if record.legacy is not None:
        if len(target) > 4:
            return False
        padded = (1,) * (4 - len(target)) + target
        return padded == tuple(record.legacy)
    return tuple(record.shape or ()) == target


class Binding:
    """The result of matching a Model's blobs to a Graph.

    arrays: {layer name: [float32 array in the net's shape, ...]} for matched layers.
    missing: net layers that own blobs but are absent from the weights (they keep fillers).
    unused: layers in the weights with no layer of that name in the net.
    """

    def __init__(self, arrays, missing, unused):
        self.arrays = arrays
        self.missing = missing
        self.unused = unused


def bind(graph, model, source="weights"):
    """Match `model` (caffeish.formats.io.Model) to `graph` (caffeish.graph.Graph) and check every shape."""
    stored = model.layer_blobs()
    arrays = {}
    missing = []
    net_names = set()
    for node in graph.nodes:
        net_names.add(node.name)
        if node.name not in stored:
            if node.param_shapes:
                missing.append(node.name)
            continue
        records = stored[node.name]
        if len(records) != len(node.param_shapes):
            raise WeightError(
                f"layer '{node.name}' ({node.type}): {source} hold {len(records)} blob(s) "
                f"{[r.declared_shape for r in records]}, but the net expects {len(node.param_shapes)} "
                f"{node.param_shapes}"
            )
        out = []
        for i, (record, target) in enumerate(zip(records, node.param_shapes)):
            if not shape_equals(record, target):
                raise WeightError(
                    f"layer '{node.name}' ({node.type}): blob {i} has shape {record.declared_shape} in the "
                    f"{source}, but the net expects {tuple(target)}"
                )
            out.append(record.array().reshape(target))
        arrays[node.name] = out
    unused = [name for name in stored if name not in net_names]
    return Binding(arrays, missing, unused)
