"""The package's imports go one way, stage by stage, with no cycle.

Every import statement of every module is read from the source (module level
and inside functions alike: a lazy import is still a dependency), and:
  * no module reaches a module of a later stage (README's layout section):
        errors, values -> formats -> graph -> runtime (+ ops, kernels) -> pycaffe -> data -> apps -> web -> tools
    (the root `caffeish` module, the public face, may import anything);
  * the modules' import graph has no cycle;
  * setup.py installs every subpackage, and maps the top-level folders as
    caffeish.FOLDERS does for a source checkout.
The graph's registry loads the layer families (caffeish.ops) by name, a plug-in
load that no import statement shows; ops in turn import the registry.
"""
import ast
import pathlib

import caffeish

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Stage of each top-level part of the package, in the order imports may flow.
STAGES = [
    ("caffeish.errors", "caffeish.values"),
    ("caffeish.proto", "caffeish.formats"),
    ("caffeish.graph",),
    ("caffeish.runtime", "caffeish.ops", "caffeish.kernels"),
    ("caffeish.pycaffe",),
    ("caffeish.data",),
    ("caffeish.apps",),
    ("caffeish.web",),  # the web app: a face beside tools/ (tools/serve.py starts it)
    ("caffeish.tools",),
]


def package_folders():
    """Import name -> source folder for every part of the installed package."""
    folders = {"caffeish": ROOT / "caffeish"}
    for name, folder in caffeish.FOLDERS.items():
        folders[f"caffeish.{name}"] = ROOT / folder
    return folders


def modules():
    """Dotted module name -> source path, for every .py file the package installs."""
    found = {}
    for prefix, folder in package_folders().items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if prefix == "caffeish" and parts and f"caffeish.{parts[0]}" in package_folders():
                continue  # a mapped folder inside caffeish/ (an installed tree): not in a checkout
            found[".".join([prefix] + parts)] = path
    return found


def imports_of(name, path, known):
    """The caffeish modules a module imports, as (line, target) pairs."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        else:
            continue
        for target in targets:
            if target == "caffeish" or not target.startswith("caffeish."):
                # The root package runs before any of its modules, whoever imports it.
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if (node.lineno, target) not in out:
                out.append((node.lineno, target))
    return out


def stage_of(module):
    for i, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def import_graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}, known


def test_every_module_has_a_stage():
    known = modules()
    assert len(known) > 60, "the walk found too few modules"
    missing = [m for m in known if m != "caffeish" and stage_of(m) is None]
    assert not missing, f"modules outside every stage (add them to README's layout and STAGES): {missing}"


def test_imports_flow_one_way():
    graph, known = import_graph()
    wrong = []
    for module, edges in graph.items():
        if module == "caffeish":
            continue  # the public face
        for line, target in edges:
            if stage_of(target) > stage_of(module):
                wrong.append(f"{known[module].relative_to(ROOT)}:{line}: {module} imports {target}, a later stage")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph, known = import_graph()
    deps = {m: sorted({t for _, t in edges if t != m}) for m, edges in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "active"
        stack.append(m)
        for t in deps.get(m, ()):
            if state.get(t) == "active":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_lazy_imports():
    # A function-level import is an edge too (the check must not pass by missing them).
    known = modules()
    edges = dict(imports_of("caffeish.runtime.backend", known["caffeish.runtime.backend"], known))
    assert "caffeish.kernels" in edges.values()  # imported inside get(), only when a GPU is asked for


def _setup_arguments():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("packages", "package_dir")}


def test_setup_installs_every_package_and_maps_the_folders():
    args = _setup_arguments()
    mapped = {name: folder for name, folder in args["package_dir"].items() if name != "caffeish"}
    assert mapped == {f"caffeish.{n}": f for n, f in caffeish.FOLDERS.items()}
    packages = {m for m, path in modules().items() if path.name == "__init__.py"}
    assert packages == set(args["packages"]), "setup.py's packages and the package folders differ"


def test_layers_name_is_free_for_netspec():
    # pycaffe's `from caffe import layers as L` is NetSpec's layer factory, not our layer families.
    assert "layers" not in caffeish.FOLDERS and "caffeish.layers" not in modules()


def test_tools_hold_only_command_line_faces():
    # tools/ parses arguments, calls caffeish.apps and prints; a long module is a sign that
    # library logic crept back in (everything a tool does must be callable from Python).
    limit = 250
    long = {p.name: n for p in (ROOT / "tools").glob("*.py") if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"tools modules over {limit} lines (move their logic to caffeish/apps/): {long}"
