"""The package's layering: no import circles, no library module importing another inside a
function (which is how circles were hidden), and no library file over 450 lines.

Only the command modules (``diffusion_jax/commands/``) import the library inside functions: they
are the top layer, and defer it so that ``--help`` and Ctrl-C are quick (nothing imports them)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "diffusion_jax"
MAX_LINES = 450
# Function-local imports still to be moved to the top of a module (none left). The test fails when
# one is fixed and still listed, so the list only shrinks.
PENDING: dict[str, set[str]] = {}


def modules() -> dict[str, ast.Module]:
    """{path relative to the package: parsed module}, for every library module."""
    return {
        str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def module_name(rel: str) -> str:
    parts = ["diffusion_jax", *pathlib.PurePath(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node) -> set[str]:
    """The diffusion_jax modules an import statement names (``from diffusion_jax import x``
    names the submodule ``diffusion_jax.x`` when there is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "diffusion_jax"}
    if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
        return set()
    if node.module == "diffusion_jax":
        names = {f"diffusion_jax.{a.name}" for a in node.names}
        return {n for n in names if n in NAMES} or {"diffusion_jax"}
    return {node.module} if node.module.split(".")[0] == "diffusion_jax" else set()


NAMES = {module_name(rel) for rel in modules()}


def local_imports(tree: ast.Module) -> set[str]:
    """diffusion_jax modules imported anywhere but the module's top level."""
    top = {id(n) for n in tree.body}
    return {m for n in ast.walk(tree) if id(n) not in top for m in imported(n)}


def graph() -> dict[str, set[str]]:
    """{module: the diffusion_jax modules it imports at its top level}."""
    return {
        module_name(rel): {m for n in tree.body for m in imported(n)} - {"diffusion_jax"}
        for rel, tree in modules().items()
    }


def test_no_library_module_imports_the_library_inside_a_function():
    found = {}
    for rel, tree in modules().items():
        if rel.startswith("commands/"):
            continue
        local = local_imports(tree)
        if local:
            found[rel] = local
    assert found == PENDING, (
        "import diffusion_jax modules at the top of the module (a function-local import hides "
        f"an import circle or a layering mistake): {found}"
    )


def test_the_import_graph_is_acyclic():
    """Depth-first search over top-level imports, plus the pending local ones (moving those to
    the top must not make a circle either)."""
    edges = graph()
    for rel, names in PENDING.items():
        edges[module_name(rel)] |= names
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_checks_find_what_they_look_for():
    tree = ast.parse(
        "from diffusion_jax import samplers\n"
        "def f():\n    from diffusion_jax import config\n    import diffusion_jax.data\n"
    )
    assert local_imports(tree) == {"diffusion_jax.config", "diffusion_jax.data"}
    assert {m for n in tree.body for m in imported(n)} == {"diffusion_jax.samplers"}


def test_no_library_file_is_over_450_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (at most {MAX_LINES} lines each): {long}"
