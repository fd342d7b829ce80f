"""caffeish summary: parameters split into weights and biases, MACs per image and per batch."""
import csv
import io as stdio
import json

from caffeish.tools.cli import main
from conftest import ROOT

EXAMPLE = ROOT / "examples" / "lenet_deploy.prototxt"

MIXED = """
name: "mixed"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 2 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 5 kernel_size: 3 } }
layer { name: "nobias" type: "Convolution" bottom: "conv" top: "nobias"
  convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "nobias" top: "nobias" }
layer { name: "scale" type: "Scale" bottom: "nobias" top: "nobias" scale_param { bias_term: true } }
layer { name: "bias" type: "Bias" bottom: "nobias" top: "biased" }
layer { name: "prelu" type: "PReLU" bottom: "biased" top: "biased" }
layer { name: "fc" type: "InnerProduct" bottom: "biased" top: "fc" inner_product_param { num_output: 7 } }
"""


def _json(capsys, *argv):
    assert main(["summary", *map(str, argv), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_weights_and_biases_are_separate_columns(tmp_path, capsys):
    net = tmp_path / "mixed.prototxt"
    net.write_text(MIXED)
    doc = _json(capsys, net)
    split = {r["name"]: (r["weight_params"], r["bias_params"], r["params"]) for r in doc["rows"]}
    assert split["conv"] == (5 * 2 * 3 * 3, 5, 95)
    assert split["nobias"] == (4 * 5, 0, 20)
    assert split["bn"] == (4 + 4 + 1, 0, 9)  # mean, variance, scale factor: not biases
    assert split["scale"] == (4, 4, 8)
    assert split["bias"] == (0, 4, 4)
    assert split["prelu"] == (4, 0, 4)
    assert split["fc"] == (7 * 4 * 2 * 2, 7, 119)
    totals = doc["totals"]
    assert totals["weight_params"] + totals["bias_params"] == totals["params"] == sum(p for _, _, p in split.values())
    assert totals["bias_params"] == 5 + 4 + 4 + 7


def test_macs_per_image_and_per_batch_in_every_format(capsys):
    doc = _json(capsys, EXAMPLE, "--input-shape", "data=4,1,28,28")
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["conv1"]["macs"] == 4 * 288_000 and rows["conv1"]["macs_per_image"] == 288_000
    assert (rows["conv1"]["weight_params"], rows["conv1"]["bias_params"]) == (500, 20)
    assert doc["totals"]["macs"] == 4 * doc["totals"]["macs_per_image"] and doc["batch"] == 4
    assert any("batch: 4" in n for n in doc["notes"])

    assert main(["summary", str(EXAMPLE), "--input-shape", "data=4,1,28,28"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-5:] == ["params", "weights", "biases", "MACs/image", "MACs/batch"]
    conv1 = next(line for line in lines if line.startswith("conv1 ")).split()
    assert conv1[-5:] == ["520", "500", "20", "288,000", "1,152,000"]
    assert "batch: 4 (the first dimension of 'data')" in lines[-1]

    assert main(["summary", str(EXAMPLE), "--input-shape", "data=4,1,28,28", "--format", "csv"]) == 0
    table = list(csv.DictReader(stdio.StringIO(capsys.readouterr().out)))
    assert table[1]["name"] == "conv1" and table[1]["macs"] == "1152000" and table[1]["macs_per_image"] == "288000"
    assert (table[1]["weight_params"], table[1]["bias_params"]) == ("500", "20")
    assert table[-1]["macs_per_image"] == str(doc["totals"]["macs_per_image"])

    assert main(["summary", str(EXAMPLE), "--input-shape", "data=4,1,28,28", "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "| params | weights | biases | MACs/image | MACs/batch |" in md
    assert "| 520 | 500 | 20 | 288,000 | 1,152,000 |" in md


def test_a_caffemodel_alone_is_still_summarized(tmp_path, capsys):
    import caffeish
    weights = tmp_path / "w.caffemodel"
    caffeish.Net(str(EXAMPLE), caffeish.TEST).save(str(weights))
    doc = _json(capsys, weights, "--input-shape", "data=1,1,28,28")
    assert doc["totals"]["params"] == 431_080
