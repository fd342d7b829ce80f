"""The `caffeish` command: summary and upgrade, output formats, one-line errors."""
import csv
import io as stdio
import json
import subprocess
import sys

import pytest

from caffeish.formats import io
from caffeish.tools.cli import main
from conftest import ROOT, shared_path

EXAMPLE = ROOT / "examples" / "lenet_deploy.prototxt"


def run_cli(*args):
    """Run the real command in a subprocess: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "caffeish.tools.cli", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_summary_table_on_bundled_example():
    code, out, err = run_cli("summary", EXAMPLE)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"]
    row = next(l for l in lines if l.startswith("conv1 "))
    # conv1: 20 x (1*5*5) + 20 = 520 params, 20*24*24*25 = 288,000 MACs
    assert "1x20x24x24" in row and "520" in row and "288,000" in row
    assert any(l.startswith("total") and "431,080" in l for l in lines)


def test_summary_json_and_csv(capsys):
    assert main(["summary", str(EXAMPLE), "--format", "json", "--input-shape", "data=4,1,28,28"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["ip1"]["top_shapes"] == [[4, 500]]
    assert rows["ip1"]["params"] == 800 * 500 + 500
    assert doc["totals"]["params"] == 431_080
    assert doc["outputs"] == ["prob"]
    assert main(["summary", str(EXAMPLE), "--format", "csv"]) == 0
    table = list(csv.DictReader(stdio.StringIO(capsys.readouterr().out)))
    assert table[1]["name"] == "conv1" and table[1]["macs"] == "288000"
    assert main(["summary", str(EXAMPLE), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| layer | type |")


def test_summary_with_weights_flags_missing_and_unused(tmp_path, capsys):
    proto = shared_path("models", "lenet_caffe_tensorflow", "examples", "mnist", "lenet.prototxt")
    weights = shared_path("models", "lenet_caffe_tensorflow", "examples", "mnist", "lenet_iter_10000.caffemodel")
    assert main(["summary", str(proto), str(weights), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["missing"] == [] and doc["unused"] == []
    # Rename a layer in the net: it is missing from the weights, and the weights' one is unused.
    net, _ = io.read_prototxt(proto)
    for layer in net.layer:
        if layer.name == "ip2":
            layer.name = "score"
    renamed = tmp_path / "renamed.prototxt"
    io.write_prototxt(renamed, net)
    assert main(["summary", str(renamed), str(weights), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["missing"] == ["score"] and doc["unused"] == ["ip2"]


def test_weight_shape_mismatch_names_layer_and_shapes(tmp_path):
    proto = shared_path("models", "lenet_caffe_tensorflow", "examples", "mnist", "lenet.prototxt")
    weights = shared_path("models", "lenet_caffe_tensorflow", "examples", "mnist", "lenet_iter_10000.caffemodel")
    net, _ = io.read_prototxt(proto)
    for layer in net.layer:
        if layer.name == "conv1":
            layer.convolution_param.num_output = 16
    bad = tmp_path / "bad.prototxt"
    io.write_prototxt(bad, net)
    code, out, err = run_cli("summary", bad, weights)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "layer 'conv1'" in err and "(20, 1, 5, 5)" in err and "(16, 1, 5, 5)" in err


@pytest.mark.parametrize("content, needle", [
    ('layer { name: "a" type: "ReLU" bottom: "x" top: "y" \n', 'Expected "}"'),
    ('layer { name: "a" type: "Upsample" }\n', "closest supported type: 'Deconvolution'"),
])
def test_errors_are_one_line_without_traceback(tmp_path, content, needle):
    p = tmp_path / "n.prototxt"
    p.write_text(content)
    code, out, err = run_cli("summary", p)
    assert code == 1
    assert err.startswith("caffeish summary: error: ") and err.count("\n") == 1
    assert needle.lower() in err.lower() and "Traceback" not in err


def test_missing_file_is_a_clear_error(tmp_path):
    code, _, err = run_cli("summary", tmp_path / "nope.prototxt")
    assert code == 1 and "nope.prototxt" in err and "Traceback" not in err


def test_upgrade_command_on_v1_prototxt(tmp_path):
    src = shared_path("models", "everpeace_caffe", "examples", "mnist", "lenet_train_test.prototxt")
    before = src.read_bytes()
    dst = tmp_path / "new.prototxt"
    code, out, err = run_cli("upgrade", src, dst)
    assert code == 0, err
    assert "CONVOLUTION" in out and "change(s)" in out
    net, changes = io.read_prototxt(dst)
    assert changes == [] and not len(net.layers)
    assert {l.type for l in net.layer} >= {"Data", "Convolution", "Pooling", "InnerProduct", "SoftmaxWithLoss"}
    assert src.read_bytes() == before
    code, _, err = run_cli("upgrade", dst, dst)
    assert code == 1 and "overwrite" in err


def test_upgrade_command_on_v1_caffemodel(tmp_path):
    src = shared_path("models", "everpeace_caffe", "examples", "mnist", "lenet_iter_10000.caffemodel")
    dst = tmp_path / "new.caffemodel"
    code, out, err = run_cli("upgrade", src, dst)
    assert code == 0, err
    old, new = io.read_caffemodel(src), io.read_caffemodel(dst)
    assert new.changes == [] and new.net == old.net
    for name, arrays in old.arrays().items():
        assert all((a == b).all() for a, b in zip(arrays, new.arrays()[name]))


def test_upgrade_command_on_solver_with_v1_nets_inside(tmp_path):
    """BVLC's consolidated LeNet solver holds V1 nets; the solver_type enum becomes a type string."""
    src = shared_path("models", "bvlc_caffe", "examples", "mnist", "lenet_consolidated_solver.prototxt")
    dst = tmp_path / "solver.prototxt"
    code, out, err = run_cli("upgrade", src, dst)
    assert code == 0, err
    from caffeish.formats.schema import pb
    solver, _ = io.read_prototxt(dst, message=pb.SolverParameter())
    assert len(solver.net_param.layer) and not len(solver.net_param.layers)
    assert "net_param: " in out
    old = tmp_path / "old_solver.prototxt"
    old.write_text('net: "train_val.prototxt"\nbase_lr: 0.01\nsolver_type: NESTEROV\n')
    code, out, err = run_cli("upgrade", old, tmp_path / "new_solver.prototxt")
    assert code == 0, err
    solver, _ = io.read_prototxt(tmp_path / "new_solver.prototxt", message=pb.SolverParameter())
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")


def test_solver_given_as_net_is_explained(tmp_path):
    src = shared_path("models", "bvlc_caffe", "examples", "mnist", "lenet_solver.prototxt")
    code, _, err = run_cli("summary", src)
    assert code == 1 and "solver prototxt" in err


def test_max_blob_bytes_takes_sizes(capsys):
    assert main(["summary", str(EXAMPLE), "--max-blob-bytes", "1K"]) == 1
    assert "over the cap of 1,024 bytes" in capsys.readouterr().err
    assert main(["summary", str(EXAMPLE), "--max-blob-bytes", "8G"]) == 0
    with pytest.raises(SystemExit):
        main(["summary", str(EXAMPLE), "--max-blob-bytes", "-3"])
    assert "expected a positive size" in capsys.readouterr().err


def test_every_size_option_reads_width_first():
    from caffeish.errors import CaffeishError
    from caffeish.values import parse_wxh
    assert parse_wxh("500x375") == (500, 375) and parse_wxh("256") == (256, 256)
    for bad in ("0x5", "5x", "axb", "1x2x3"):
        with pytest.raises(CaffeishError, match="--resize: expected WIDTHxHEIGHT"):
            parse_wxh(bad, "--resize")


def test_one_spelling_per_option_in_every_subcommand(capsys):
    """--mean FILE (alias --mean-file), --mean-value B,G,R and --ignore-label N|none (-1: none) read the
    same in classify, segment and evaluate (tools/options.py)."""
    import pytest

    from caffeish.tools.cli import build_parser
    from caffeish.tools.options import IGNORE_LABEL_FROM_NET

    parser = build_parser()
    commands = (["classify", "n", "w", "i"], ["segment", "n", "w", "i", "-o", "o"],
                ["evaluate", "segmentation", "n", "w"])
    for argv in commands:
        for flag in ("--mean", "--mean-file"):
            args = parser.parse_args(argv + [flag, "m.binaryproto"])
            assert args.mean == "m.binaryproto" and args.mean_value is None
        assert parser.parse_args(argv + ["--mean-value", "1,2,3"]).mean_value == "1,2,3"
    evaluate = ["evaluate", "segmentation", "n", "w"]
    assert parser.parse_args(evaluate).ignore_label is IGNORE_LABEL_FROM_NET
    for text, want in (("255", 255), ("0", 0), ("none", None), ("None", None), ("-1", None)):
        assert parser.parse_args(evaluate + ["--ignore-label", text]).ignore_label == want
    for bad, message in (("x", "expected an integer or 'none', got 'x'"),
                         ("4294967296", "Caffe's ignore_label is a 32-bit integer, got 4294967296")):
        with pytest.raises(SystemExit):
            parser.parse_args(evaluate + ["--ignore-label", bad])
        assert f"argument --ignore-label: {message}" in capsys.readouterr().err
