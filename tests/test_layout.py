"""The package's layout rules, checked on the source tree so that they stay true: no import cycle between the
modules of `hf_finetune` (module-level imports, and imports inside functions too), modules of readable length (or a written reason), sub-package
`__init__.py` files that hold only a docstring, and private upstream names only in `hf_finetune/compat.py`."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_finetune"
MAX_LINES = 400
# Private names of torch / transformers / accelerate / timm / datasets / argparse that hf-finetune is known to need.
# A heuristic, not a proof: a new private name has to be added here (and its use moved into compat.py).
KNOWN_PRIVATE_NAMES = {
    "_remove_autograd_hooks",
    "_models",
    "_load_best_model",
    "_load_from_checkpoint",
    "_is_hf_initialized",
    "_init_weights",
    "_find_hash_in_cache",
    "_option_string_actions",
    "_manipulate",
    "_add_param_groups",
    "_last_lr",
    "_run_exitfuncs",
}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages as their `__init__`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def module_level_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that importing `path` imports: its top-level statements (and those in top-level
    `if` / `try` blocks, but not `if TYPE_CHECKING:`), not imports inside functions or classes."""

    def statements(body):
        for node in body:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from statements(node.body)
                    yield from statements(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from statements(block)
            else:
                yield node

    targets = set()
    for node in statements(ast.parse(path.read_text()).body):
        targets |= imported_modules(node, known)
    return {t for t in targets if t in known}


def imported_modules(node, known: dict[str, Path]) -> set[str]:
    """The package modules one import statement names (`from package import module` names that module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "hf_finetune"}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hf_finetune"):
        return {
            f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
            for alias in node.names
        }
    return set()


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_find_cycles_finds_a_three_module_cycle_and_nothing_in_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_level_import_cycle():
    known = modules()
    graph = {name: module_level_imports(path, known) - {name} for name, path in known.items()}
    cycles = find_cycles(graph)
    assert not cycles, "module-level import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def all_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that `path` imports anywhere, inside functions too (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    targets = set()
    for node in ast.walk(tree):
        if id(node) not in type_only:
            targets |= imported_modules(node, known)
    return {t for t in targets if t in known and t != "hf_finetune"}


def test_no_import_cycle_even_through_imports_inside_functions():
    """Layers import downwards only: a function-level import back up (deferred to keep --help fast) would hide
    a cycle that the module-level check cannot see."""
    known = modules()
    graph = {name: all_imports(path, known) - {name} for name, path in known.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def explains_its_length(path: Path) -> bool:
    """Whether the first paragraph of the module's docstring says why it is long (it mentions its lines)."""
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = docstring.strip().split("\n\n")[0].lower()
    return "lines" in first and any(word in first for word in ("because", "since", "why", ":"))


def test_every_module_is_short_or_says_why():
    offenders = []
    for path in modules().values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and not explains_its_length(path):
            offenders.append(f"{path.relative_to(PACKAGE.parent)} ({lines} lines)")
    print("\n".join(offenders))  # the list to split, in the test log
    assert not offenders, f"over {MAX_LINES} lines without a reason at the top: {', '.join(offenders)}"


def test_sub_package_init_files_hold_only_a_docstring():
    for path in sorted(PACKAGE.glob("*/__init__.py")):
        body = ast.parse(path.read_text()).body
        assert len(body) == 1, (
            f"{path.relative_to(PACKAGE.parent)}: only a docstring (no imports, no re-exports)"
        )
        assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        assert isinstance(body[0].value.value, str)


def private_name_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of each known private upstream name used as code: an identifier (attribute, import,
    override) or a string that is exactly the name (getattr / setattr). Comments and docstrings do not count."""
    uses = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string in KNOWN_PRIVATE_NAMES:
            uses.append((token.start[0], token.string))
        elif token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):
                continue
            if value in KNOWN_PRIVATE_NAMES:
                uses.append((token.start[0], value))
    return uses


def test_private_name_uses_counts_code_not_prose():
    source = (
        '"""Mentions _load_best_model in prose."""\n# _models in a comment\nx = trainer._load_best_model()\n'
    )
    source += 'y = getattr(accelerator, "_models")\n'
    assert private_name_uses(source) == [(3, "_load_best_model"), (4, "_models")]


def test_private_upstream_names_only_in_compat():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "compat.py" or path.parent != PACKAGE
        for line, name in private_name_uses(path.read_text())
    ]
    print("\n".join(offenders))  # the list to move, in the test log
    assert not offenders, "private upstream names outside hf_finetune/compat.py: " + ", ".join(offenders)


def test_no_benchmark_script_shadows_a_standard_library_module():
    """A benchmark runs with benchmarks/ first on sys.path: a script named like a standard-library module
    (inspect.py, say) would be imported in its place by every other benchmark (dataclasses imports inspect)."""
    import sys

    scripts = {path.stem for path in (PACKAGE.parent / "benchmarks").glob("*.py")}
    assert not scripts & set(sys.stdlib_module_names), sorted(scripts & set(sys.stdlib_module_names))
