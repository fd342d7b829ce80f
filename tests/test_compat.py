"""Running unchanged `import caffe` scripts on caffeish: caffeish.pycaffe.compat and `caffeish run`.

The script runs as python runs it (argv, __name__, __file__, sys.path[0], exit status,
tracebacks), `caffe` and its submodules resolve to caffeish in that process only, and
nothing named caffe exists outside it.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import caffeish
from caffeish.pycaffe import compat
from caffeish.tools import cli
from conftest import ROOT

PROBE = """\
import json, os, sys
import caffe
import caffe.io
import caffe.proto.caffe_pb2
from caffe.proto import caffe_pb2
import caffe.detector, caffe.pycaffe
import caffeish
caffe.extra = 1                        # a script's own attribute stays on its caffe module
report = {
    "name": __name__, "argv": sys.argv, "file": __file__, "path0": sys.path[0],
    "main_is_script": sys.modules["__main__"].__dict__ is globals(),
    "caffe_name": caffe.__name__,
    "net": caffe.Net is caffeish.Net, "test": caffe.TEST == caffeish.TEST,
    "layer": caffe.Layer is caffeish.Layer,
    "io": caffe.io is caffeish.io, "pb2": caffe_pb2 is caffeish.proto.caffe_pb2 is caffe.proto.caffe_pb2,
    "io_spec": caffe.io.__spec__.name, "pb2_spec": caffe_pb2.__spec__.name,
    "classifier": caffe.classifier.Classifier is caffe.Classifier,
    "detector": caffe.detector.Detector is caffe.Detector,
    "pycaffe_net": caffe.pycaffe.Net is caffeish.Net,
    "caffeish_untouched": not hasattr(caffeish, "extra") and caffeish.pycaffe.__name__ == "caffeish.pycaffe",
}
report["lazy"] = caffe.classifier is sys.modules["caffe.classifier"] and hasattr(caffe, "net_spec")
try:
    import caffe.no_such_module
except ImportError as e:
    report["missing"] = str(e)
json.dump(report, open(os.environ["PROBE_OUT"], "w"))
"""


def env(**extra):
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PYTHONDONTWRITEBYTECODE="1")
    e.update(extra)
    return e


def wrapped(cwd, *args, **extra_env):
    return subprocess.run([sys.executable, "-m", "caffeish.pycaffe.compat", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env(**extra_env), timeout=120)


def test_script_runs_as_python_runs_it(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    out = tmp_path / "report.json"
    proc = wrapped(tmp_path, "scripts/probe.py", "a", "--flag", "-h", PROBE_OUT=out)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["name"] == "__main__" and r["main_is_script"]
    assert r["argv"] == ["scripts/probe.py", "a", "--flag", "-h"]
    assert r["file"] == str(folder / "probe.py")
    assert r["path0"] == os.path.realpath(folder)
    assert r["caffe_name"] == "caffe"
    for key in ("net", "test", "layer", "io", "pb2", "classifier", "detector", "pycaffe_net", "caffeish_untouched",
                "lazy"):
        assert r[key] is True, key
    # The caffeish modules keep their own names.
    assert r["io_spec"] == "caffeish.pycaffe.io" and r["pb2_spec"] == "caffeish.proto.caffe_pb2"
    assert r["missing"] == "No module named 'caffe.no_such_module'"


@pytest.mark.parametrize("name", sorted(n for n, t in compat.SUBMODULES.items() if t))
def test_every_pycaffe_submodule_resolves(tmp_path, name):
    target = compat.SUBMODULES[name]
    script = tmp_path / "s.py"
    script.write_text(f"import caffe.{name}, {target}\nassert caffe.{name} is {target}, caffe.{name}\n")
    proc = wrapped(tmp_path, script)
    assert proc.returncode == 0, proc.stderr


def test_netspec_names(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""\
        import caffe
        from caffe import layers as L, params as P
        import caffeish.pycaffe.net_spec as ns
        assert L is ns.layers and P is ns.params and caffe.NetSpec is ns.NetSpec
        """))
    proc = wrapped(tmp_path, script)
    assert proc.returncode == 0, proc.stderr


def test_exit_status_and_tracebacks_pass_through(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""\
        import sys
        import caffe
        def fail():
            raise ValueError("the script's own error")
        if sys.argv[1] == "exit":
            sys.exit(int(sys.argv[2]))
        if sys.argv[1] == "message":
            sys.exit("stopping here")
        if sys.argv[1] == "raise":
            fail()
        if sys.argv[1] == "caffe":
            caffe.Net("no_such.prototxt", caffe.TEST)
        """))
    assert wrapped(tmp_path, script, "exit", 0).returncode == 0
    assert wrapped(tmp_path, script, "exit", 7).returncode == 7
    proc = wrapped(tmp_path, script, "message")
    assert proc.returncode == 1 and proc.stderr.strip() == "stopping here"
    proc = wrapped(tmp_path, script, "raise")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith(f'  File "{script}", line 10, in <module>')  # the script's frames only
    assert "compat" not in proc.stderr and "runpy" not in proc.stderr
    assert lines[-1] == "ValueError: the script's own error"
    proc = wrapped(tmp_path, script, "caffe")  # caffeish's errors in the script: a traceback too, as python
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "no_such.prototxt" in proc.stderr.splitlines()[-1]


def test_missing_script_is_one_line(tmp_path):
    proc = wrapped(tmp_path, "nope.py", "x")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["caffeish.pycaffe.compat: error: can't open file 'nope.py': no such file"]
    proc = wrapped(tmp_path)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = wrapped(tmp_path, "--")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["caffeish.pycaffe.compat: error: -- needs a script after it"]


def test_run_module(tmp_path):
    (tmp_path / "mymod.py").write_text("import sys, caffe\nprint(__name__, sys.argv[1:], caffe.Net.__module__)\n")
    proc = wrapped(tmp_path, "-m", "mymod", "x", "-v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["__main__", "['x',", "'-v']", "caffeish.runtime.net"]
    proc = wrapped(tmp_path, "-m", "no_such_module_here")
    assert proc.returncode == 1 and "no module named 'no_such_module_here'" in proc.stderr


def test_python_layer_in_a_wrapped_script(tmp_path):
    (tmp_path / "mylayers.py").write_text(textwrap.dedent("""\
        import caffe
        class Double(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top):
                top[0].data[...] = 2 * bottom[0].data
        """))
    (tmp_path / "net.prototxt").write_text(textwrap.dedent("""\
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "double" type: "Python" bottom: "data" top: "out"
          python_param { module: "mylayers" layer: "Double" } }
        """))
    (tmp_path / "run.py").write_text(textwrap.dedent("""\
        import numpy as np
        import caffe
        net = caffe.Net('net.prototxt', caffe.TEST)
        out = net.forward(data=np.arange(6, dtype=np.float32).reshape(2, 3))['out']
        assert out.tolist() == [[0, 2, 4], [6, 8, 10]], out
        print('ok')
        """))
    proc = wrapped(tmp_path, "run.py")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_another_caffe_is_noted_and_left_alone_outside(tmp_path):
    fake = tmp_path / "site" / "caffe"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'the other caffe'\n")
    script = tmp_path / "who.py"
    script.write_text("import caffe\nprint(getattr(caffe, 'WHO', 'caffeish'))\n")
    other = env(PYTHONPATH=str(tmp_path / "site") + os.pathsep + env()["PYTHONPATH"])
    proc = subprocess.run([sys.executable, "-m", "caffeish.pycaffe.compat", str(script)], cwd=tmp_path,
                          capture_output=True, text=True, env=other, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "caffeish"
    assert "another Caffe is importable" in proc.stderr and str(fake / "__init__.py") in proc.stderr
    plain = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                           env=other, timeout=60)
    assert plain.stdout.strip() == "the other caffe"  # without the wrapper, nothing changes


def test_no_caffe_package_is_installed(tmp_path):
    # Outside the wrapper `import caffe` finds nothing caffeish put there.
    proc = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('caffe'); "
                           "print(s.origin if s else None)"], cwd=tmp_path, capture_output=True, text=True,
                          env=env(), timeout=60)
    origin = proc.stdout.strip()
    assert origin == "None" or "caffeish" not in origin


def test_install_and_uninstall_in_process():
    saved, saved_io = sys.modules.get("caffe"), sys.modules.get("caffe.io")  # a Python layer may have set them
    meta = list(sys.meta_path)
    compat.install()
    try:
        assert compat.installed()
        import caffe
        import caffe.io
        import caffe.proto.caffe_pb2

        assert caffe.Net is caffeish.Net and caffe.io is caffeish.io
        assert caffeish.io.__spec__.name == "caffeish.pycaffe.io"
        assert "caffe.io" in sys.modules
        assert compat.other_caffe() is None
    finally:
        compat.uninstall()
    assert not compat.installed()
    assert sys.meta_path == meta
    assert sys.modules.get("caffe") is saved and sys.modules.get("caffe.io") is saved_io
    assert not hasattr(caffeish, "extra")


def test_target_of():
    assert compat.target_of("caffe") is None and compat.target_of("caffe.pycaffe") is None
    assert compat.target_of("caffe.io") == "caffeish.pycaffe.io"
    assert compat.target_of("caffe.proto.caffe_pb2") == "caffeish.proto.caffe_pb2"
    with pytest.raises(KeyError):
        compat.target_of("caffe.test")
    with pytest.raises(KeyError):
        compat.target_of("caffeine")


# ------------------------------------------------------------------ caffeish run


def test_tools_run_face(tmp_path):
    # tools/run.py: argparse with the script's arguments kept as they are, options included.
    script = tmp_path / "s.py"
    script.write_text("import sys, caffe\nprint(sys.argv)\nsys.exit(3)\n")
    code = ("import argparse, sys\nfrom caffeish.tools import run\np = argparse.ArgumentParser()\n"
            "run.add_arguments(p)\nsys.exit(run.run(p.parse_args(sys.argv[1:])))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(script), "-h", "--x", "1"], cwd=tmp_path,
                          capture_output=True, text=True, env=env(), timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == repr([str(script), "-h", "--x", "1"])
    (tmp_path / "mod.py").write_text("import sys, caffe\nprint(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", code, "-m", "mod", "-v", "x"], cwd=tmp_path,
                          capture_output=True, text=True, env=env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "['-v', 'x']", proc.stderr


def test_caffeish_run_command(tmp_path):
    assert cli.TOOLS["run"][0] == "run"
    script = tmp_path / "s.py"
    script.write_text("import sys, caffe\nprint(caffe.Net.__module__, sys.argv[1:])\n")
    main = "import sys\nfrom caffeish.tools.cli import main\nsys.exit(main())\n"
    proc = subprocess.run([sys.executable, "-c", main, "run", str(script), "--flag"], cwd=tmp_path,
                          capture_output=True, text=True, env=env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "caffeish.runtime.net ['--flag']"
    proc = subprocess.run([sys.executable, "-c", main, "run", "missing.py"], cwd=tmp_path,
                          capture_output=True, text=True, env=env(), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "caffeish run: error: can't open file 'missing.py': no such file"
