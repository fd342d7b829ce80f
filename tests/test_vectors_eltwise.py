"""Caffe's Eltwise unit-test vectors (test_eltwise_layer.cpp), from ../shared/caffe/test_vectors.json."""
import json

import numpy as np

from conftest import shared_path

import caffeish.graph.registry as registry
from caffeish.formats.io import parse_text
from caffeish.formats.schema import TEST, pb

FORMULAS = {  # the vectors' "expected" texts, as functions of the three bottoms
    "a*b*c": lambda a, b, c: a * b * c,
    "a+b+c": lambda a, b, c: a + b + c,
    "a - 0.5*b + 2*c": lambda a, b, c: a - 0.5 * b + 2 * c,
    "max(a,max(b,c)) exactly": lambda a, b, c: np.maximum(a, np.maximum(b, c)),
}


def vectors():
    data = json.load(open(shared_path("caffe", "test_vectors.json")))
    return [v for v in data if v["layer"] == "Eltwise"]


def make_layer(params):
    text = 'name: "e" type: "Eltwise" bottom: "a" bottom: "b" bottom: "c" top: "t" eltwise_param {'
    text += f' operation: {params["operation"]}'
    for c in params.get("coeff", []):
        text += f" coeff: {c}"
    return registry.create(parse_text(text + " }", pb.LayerParameter()), TEST)


def test_eltwise_vectors():
    cases = vectors()
    assert len(cases) == 5
    rng = np.random.default_rng(0)
    # Caffe's fixture: three 2x3x4x5 bottoms from a uniform filler.
    bottoms = [rng.uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32) for _ in range(3)]
    for case in cases:
        layer = make_layer(case["params"])
        if "top_shape" in case:
            assert layer.reshape([tuple(s) for s in case["bottoms"]]) == [tuple(case["top_shape"])]
            continue
        layer.reshape([b.shape for b in bottoms])
        (top,) = layer.forward(np, bottoms, [])
        want = FORMULAS[case["expected"]](*bottoms)
        assert top.dtype == np.float32
        if "exactly" in case["expected"]:
            np.testing.assert_array_equal(top, want)
        else:
            np.testing.assert_allclose(top, want, rtol=0, atol=case["tolerance"])
