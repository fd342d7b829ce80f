"""Run an unchanged pycaffe script (one that says `import caffe`) on caffeish.

    python -m caffeish.pycaffe.compat script.py ARGS...      # or: caffeish run script.py ARGS...
    python -m caffeish.pycaffe.compat -m unittest discover   # a module, as `python -m`

For that process only, `caffe` and its submodules resolve to caffeish:

    caffe                   caffeish's public face (Net, TEST, set_mode_gpu, Layer, Classifier, ...)
    caffe.io                caffeish.pycaffe.io (Transformer, load_image, blobproto helpers)
    caffe.proto[.caffe_pb2] caffeish.proto[.caffe_pb2]
    caffe.classifier        caffeish.pycaffe.classifier      caffe.detector  caffeish.pycaffe.detector
    caffe.net_spec          caffeish.pycaffe.net_spec        caffe.draw      caffeish.pycaffe.draw
    caffe.coord_map         caffeish.pycaffe.coord_map       caffe._caffe    caffeish.pycaffe._caffe
    caffe.pycaffe           caffeish's public face again (`from caffe.pycaffe import Net`)

`from caffe import layers as L, params as P` gives NetSpec's factories.  Nothing
named `caffe` is installed anywhere: a finder on sys.meta_path (`install()`)
answers those names in this process, and the script then runs as python runs
it: sys.argv is the script and its arguments, `__name__ == '__main__'`, the
script's folder (symlinks resolved) comes first on sys.path, its exit status
and exceptions pass through (an exception prints the script's traceback and
gives status 1).  `caffe` itself is a small module that forwards every
attribute to caffeish, so the script's own `caffe.x = ...` or `import caffe.draw`
never changes the caffeish module.

Child processes that fork (multiprocessing's default on Linux) inherit all this; children
started afresh ('spawn', subprocess) do not: run them through the wrapper too.

When a real Caffe is importable too, the wrapper says so on stderr and still
gives caffeish inside the wrapper; outside it `import caffe` finds that Caffe,
as before.  A script or module that cannot be found is one error line (status 1).
"""
import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types

from caffeish.errors import CaffeishError

ROOT_NAME = "caffe"
TARGET = "caffeish"

# pycaffe module -> the caffeish module that takes its place (None: the public face again, forwarded).
SUBMODULES = {
    "io": "caffeish.pycaffe.io",
    "proto": "caffeish.proto",
    "classifier": "caffeish.pycaffe.classifier",
    "detector": "caffeish.pycaffe.detector",
    "net_spec": "caffeish.pycaffe.net_spec",
    "draw": "caffeish.pycaffe.draw",
    "coord_map": "caffeish.pycaffe.coord_map",
    "_caffe": "caffeish.pycaffe._caffe",
    "pycaffe": None,
}

# The submodules pycaffe's caffe/__init__.py imports, hence attributes of `caffe` without an import
# of their own (caffe.draw and caffe.coord_map need one, as in pycaffe).
IMPORTED_BY_INIT = ("io", "proto", "classifier", "detector", "net_spec", "pycaffe", "_caffe")

__all__ = ["install", "uninstall", "installed", "target_of", "other_caffe", "run_path", "run_module", "main"]


class CaffeAlias(types.ModuleType):
    """The `caffe` module of a wrapped process: every attribute comes from caffeish's public face."""

    def __init__(self, name):
        super().__init__(name, _target().__doc__)
        self.__path__ = []  # a package: `import caffe.io` asks the finder below

    def __getattr__(self, name):
        if name == "__all__":  # `from caffe import *`: caffeish's public names
            return _public_names()
        if name.startswith("__") and name.endswith("__") and name not in ("__file__", "__version__"):
            raise AttributeError(name)
        if self.__name__ == ROOT_NAME and name in IMPORTED_BY_INIT:
            return importlib.import_module(f"{ROOT_NAME}.{name}")  # as pycaffe's __init__ imports them
        try:
            return getattr(_target(), name)
        except AttributeError:
            raise AttributeError(f"module '{self.__name__}' (caffeish) has no attribute '{name}'") from None

    def __dir__(self):
        target = _target()
        return sorted(set(super().__dir__()) | set(dir(target)) | set(getattr(target, "_LAZY", ())))

    def __repr__(self):
        return f"<module '{self.__name__}' (caffeish, from {_target().__file__!r})>"


def _target():
    return importlib.import_module(TARGET)


def _public_names():
    """What `from caffe import *` gives: caffeish's public names, lazy ones whose module is there."""
    target = _target()
    names = {n for n in vars(target) if not n.startswith("_") and not isinstance(vars(target)[n], types.ModuleType)}
    names |= {"io"}
    for name, (module, _) in getattr(target, "_LAZY", {}).items():
        try:
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        except (ImportError, ValueError):
            pass
    return sorted(names)


def target_of(fullname):
    """The caffeish module name for a pycaffe module name ('caffe.io' -> 'caffeish.pycaffe.io').

    None for the names that are aliases of the public face ('caffe', 'caffe.pycaffe'); KeyError
    for a name pycaffe does not have.
    """
    if fullname == ROOT_NAME:
        return None
    if not fullname.startswith(ROOT_NAME + "."):
        raise KeyError(fullname)
    head, _, rest = fullname[len(ROOT_NAME) + 1:].partition(".")
    if head not in SUBMODULES:
        raise KeyError(fullname)
    target = SUBMODULES[head]
    if rest:
        if target is None:
            raise KeyError(fullname)
        return f"{target}.{rest}"
    return target


class _AliasLoader(importlib.abc.Loader):
    """Hands out an existing caffeish module under its pycaffe name (the module is not re-run)."""

    def __init__(self, module):
        self.module = module
        self.spec = getattr(module, "__spec__", None)

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        # The import system stamps the alias spec on the module it loaded; the caffeish
        # module keeps its own (its name, its relative imports, reload).
        if self.spec is not None:
            module.__spec__ = self.spec


class CaffeFinder(importlib.abc.MetaPathFinder):
    """Answers `caffe.<submodule>` with caffeish's modules while installed (see the module doc)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ROOT_NAME and not fullname.startswith(ROOT_NAME + "."):
            return None
        try:
            name = target_of(fullname)
        except KeyError:
            return None  # not a pycaffe module: the usual "No module named ..." follows
        if name is None:
            module = CaffeAlias(fullname)
        else:
            module = importlib.import_module(name)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(module),
                                              is_package=hasattr(module, "__path__"))


_state = {"finder": None, "saved": None}


def installed():
    """True while `caffe` resolves to caffeish in this process."""
    return _state["finder"] is not None


def other_caffe():
    """The file of a Caffe that `import caffe` would find without the wrapper (None when none)."""
    if installed():
        return None
    module = sys.modules.get(ROOT_NAME)
    if module is not None:
        if module is _target() or isinstance(module, CaffeAlias):
            return None  # caffeish itself (a Python layer's `import caffe` puts it there)
        return getattr(module, "__file__", None) or repr(module)
    try:
        spec = importlib.util.find_spec(ROOT_NAME)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "namespace"):
        return None  # nothing, or a bare folder named caffe (a namespace package), not a Caffe
    return spec.origin


def install():
    """Make `import caffe` (and its submodules) give caffeish in this process; undo with uninstall().

    Modules named caffe that were already imported are set aside and put back by uninstall().
    """
    if installed():
        return _state["finder"]
    names = [n for n in sys.modules if n == ROOT_NAME or n.startswith(ROOT_NAME + ".")]
    _state["saved"] = {n: sys.modules.pop(n) for n in names}
    finder = CaffeFinder()
    sys.meta_path.insert(0, finder)
    _state["finder"] = finder
    importlib.import_module(ROOT_NAME)
    return finder


def uninstall():
    """Remove the finder and the caffe modules it gave; put back any set aside by install()."""
    finder = _state["finder"]
    if finder is None:
        return
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    for n in [n for n in sys.modules if n == ROOT_NAME or n.startswith(ROOT_NAME + ".")]:
        del sys.modules[n]
    sys.modules.update(_state["saved"] or {})
    _state["finder"] = _state["saved"] = None


def _note_other_caffe(stream):
    where = other_caffe()
    if where:
        print(f"caffeish: note: another Caffe is importable ({where}); inside this run `import caffe` "
              f"gives caffeish", file=stream)


def _user_traceback(tb):
    """The traceback from the script's first frame on (the wrapper's and runpy's frames dropped)."""
    here = os.path.abspath(__file__)
    skip = {here, os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while tb is not None and (tb.tb_frame.f_code.co_filename in skip
                              or os.path.abspath(tb.tb_frame.f_code.co_filename) in skip):
        tb = tb.tb_next
    return tb


def _run(call):
    try:
        call()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # the script's own error: its traceback, status 1, as python gives
        tb = _user_traceback(e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)  # python's hook prints e.__traceback__
        return 1
    return 0


def run_path(script, args=(), note=True):
    """Run a script file as `python script ARGS` would, with `caffe` resolving to caffeish.

    Returns the exit status (0, or 1 after an exception, whose traceback is printed);
    sys.exit() in the script raises SystemExit as usual.  CaffeishError when the file is missing.
    """
    script = os.fspath(script)
    if not os.path.exists(script):
        raise CaffeishError(f"can't open file '{script}': no such file")
    if os.path.isdir(script) and not os.path.exists(os.path.join(script, "__main__.py")):
        raise CaffeishError(f"can't run '{script}': a folder without __main__.py")
    is_source = os.path.isfile(script) and not _is_zip(script)
    _set_path0(os.path.dirname(os.path.realpath(script)) if is_source else os.path.abspath(script))
    sys.argv[:] = [script] + list(args)
    if note:
        _note_other_caffe(sys.stderr)
    install()
    if not is_source:  # a folder or zip file with __main__.py
        return _run(lambda: runpy.run_path(script, run_name="__main__"))
    return _run(lambda: _exec_main(script))


def _is_zip(path):
    import zipfile

    return zipfile.is_zipfile(path)


def _exec_main(script):
    """Run a source file as python runs its script: a fresh __main__ module, __file__ absolute."""
    path = os.path.abspath(script)
    with open(path, "rb") as f:  # bytes: compile() honours the file's coding declaration
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    sys.modules["__main__"] = main  # stays: pickling, atexit and multiprocessing see the script as __main__
    exec(code, main.__dict__)


def run_module(module, args=(), note=True):
    """Run a module as `python -m module ARGS` would (the current folder first on sys.path)."""
    _set_path0(os.getcwd())
    if note:
        _note_other_caffe(sys.stderr)
    install()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise CaffeishError(f"no module named '{module}' ({e})") from None
    if spec is None:
        raise CaffeishError(f"no module named '{module}'")
    sys.argv[:] = [spec.origin or module] + list(args)
    return _run(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))


def _set_path0(folder):
    """Put `folder` where python puts the script's folder: sys.path[0], the wrapper's own entry.

    Under `python -P` (safe_path) python adds no such folder, and neither does this.
    """
    if getattr(sys.flags, "safe_path", False):
        return
    if sys.path:
        sys.path[0] = folder
    else:
        sys.path.append(folder)


USAGE = """usage: python -m caffeish.pycaffe.compat SCRIPT.py [ARGS...]
       python -m caffeish.pycaffe.compat -m MODULE [ARGS...]

Runs an unchanged pycaffe script with `import caffe` resolving to caffeish (this process only)."""


def main(argv=None):
    """`python -m caffeish.pycaffe.compat`: returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "caffeish.pycaffe.compat"
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        if argv[0] == "-m":
            if len(argv) < 2:
                print(f"{prog}: error: -m needs a module name", file=sys.stderr)
                return 2
            return run_module(argv[1], argv[2:])
        if argv[0].startswith("-m") and len(argv[0]) > 2:
            return run_module(argv[0][2:], argv[1:])
        if argv[0] == "--":
            argv = argv[1:]
            if not argv:
                print(f"{prog}: error: -- needs a script after it", file=sys.stderr)
                return 2
        return run_path(argv[0], argv[1:])
    except CaffeishError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
