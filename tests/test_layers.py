"""The package's layers (docs/design.md#layers): no module imports a higher layer, no cycle between layers.

Read from the source with ``ast`` (nothing is imported).  Every import counts wherever it is written:
at module level, inside a function (a lazy import is still a dependency, only a later one), under
``if TYPE_CHECKING:``, and ``importlib.import_module("nemo_xtoken...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nemo_xtoken"

#: Bottom to top.  A module belongs to the layer of its longest matching prefix; it may import its own
#: layer and the ones below.  ``cpu`` is the CPU runtime (gloo groups, CUDA redirects, the scoped
#: transformer_engine hook) that ``xtoken check-model`` / ``distill --check`` use, below
#: ``integration``; the rehearsal (``cpu.rehearse*``) runs the integration's training, so it sits above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("nemo_xtoken", "nemo_xtoken.errors", "nemo_xtoken.assets")),
    ("vocab", ("nemo_xtoken.vocab",)),
    ("align", ("nemo_xtoken.align",)),
    ("losses", ("nemo_xtoken.losses",)),
    ("parallel", ("nemo_xtoken.parallel",)),
    ("data", ("nemo_xtoken.data",)),
    ("offline", ("nemo_xtoken.offline",)),
    ("cpu", ("nemo_xtoken.cpu",)),
    ("integration", ("nemo_xtoken.integration",)),
    ("rehearse", ("nemo_xtoken.cpu.rehearse", "nemo_xtoken.cpu.rehearse_worker", "nemo_xtoken.cpu.rehearse_zygote")),
    ("demo", ("nemo_xtoken.demo",)),
    ("cli", ("nemo_xtoken.cli",)),
    ("testing", ("nemo_xtoken.testing",)),
]
_EXACT = {"nemo_xtoken"}  # the package's __init__ only, not everything under it


def layer_of(module: str) -> int | None:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            hit = module == p if p in _EXACT else module == p or module.startswith(p + ".")
            if hit and len(p) > best:
                best, rank = len(p), i
    return rank


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """``(line, imported nemo_xtoken module)`` for every import in the file, lazy ones included."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if sub in known else mod))
        elif (
            isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        ):
            out.append((node.lineno, node.args[0].value))
    return sorted({(ln, m) for ln, m in out if m == "nemo_xtoken" or m.startswith("nemo_xtoken.")})


def layer_violations(root: Path = ROOT) -> tuple[list[str], list[str], list[str]]:
    """(unplaced modules, upward imports, cycles between layers), each as readable lines."""
    mods = package_modules(root)
    known = set(mods)
    unplaced = [f"{m} ({p}) is in no layer: add it to LAYERS in tests/test_layers.py and docs/design.md" for m, p in mods.items() if layer_of(m) is None]
    upward, edges = [], {}
    for m, p in mods.items():
        src = layer_of(m)
        for ln, target in imports_of(m, p, known):
            dst = layer_of(target)
            if src is None or dst is None or dst == src:
                continue
            where = f"{p.relative_to(root.parent)}:{ln}"
            edges.setdefault((src, dst), []).append(f"{where} imports {target}")
            if dst > src:
                upward.append(f"{where}: {m} (layer {LAYERS[src][0]}) imports {target} (higher layer {LAYERS[dst][0]})")
    # cycles between layers: strongly connected components of the layer graph with more than one layer
    succ: dict[int, set[int]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reach(a: int) -> set[int]:
        seen, todo = set(), [a]
        while todo:
            for b in succ.get(todo.pop(), ()):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    r = {i: reach(i) for i in range(len(LAYERS))}
    cycles, done = [], set()
    for i in range(len(LAYERS)):
        comp = sorted({i} | {j for j in r[i] if i in r[j]})
        if len(comp) > 1 and tuple(comp) not in done:
            done.add(tuple(comp))
            via = [e for (a, b), es in edges.items() if a in comp and b in comp for e in es[:1]]
            cycles.append(f"cycle between layers {[LAYERS[c][0] for c in comp]}: " + "; ".join(via))
    return unplaced, upward, cycles


def test_every_module_has_a_layer_and_imports_point_down():
    unplaced, upward, cycles = layer_violations()
    assert not (unplaced or upward or cycles), "\n".join(unplaced + ["imports from a higher layer:"] + upward + cycles)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        f = root / "nemo_xtoken" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text, encoding="utf-8")
    return root / "nemo_xtoken"


def test_the_check_finds_a_lazy_upward_import_a_cycle_and_an_unplaced_module(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "vocab/__init__.py": "def f():\n    from ..align import core  # lazy, relative\n",
        "align/__init__.py": "",
        "align/core.py": "from nemo_xtoken.vocab import f\n",
        "data/__init__.py": "import importlib\nx = importlib.import_module('nemo_xtoken.integration.config')\n",
        "integration/__init__.py": "", "integration/config.py": "",
        "newthing.py": "",
    })
    unplaced, upward, cycles = layer_violations(pkg)
    assert unplaced == [f"nemo_xtoken.newthing ({pkg / 'newthing.py'}) is in no layer: add it to LAYERS in tests/test_layers.py and docs/design.md"]
    assert upward == [
        "nemo_xtoken/data/__init__.py:2: nemo_xtoken.data (layer data) imports nemo_xtoken.integration.config (higher layer integration)",
        "nemo_xtoken/vocab/__init__.py:2: nemo_xtoken.vocab (layer vocab) imports nemo_xtoken.align.core (higher layer align)",
    ]
    assert len(cycles) == 1 and cycles[0].startswith("cycle between layers ['vocab', 'align']:")
    assert "nemo_xtoken/align/core.py:1 imports nemo_xtoken.vocab" in cycles[0]


@pytest.mark.parametrize("module, layer", [("nemo_xtoken", "base"), ("nemo_xtoken.cpu.megatron", "cpu"), ("nemo_xtoken.cpu.rehearse", "rehearse"),
                                            ("nemo_xtoken.cpu.rehearse_worker", "rehearse"), ("nemo_xtoken.cpu.rehearse_zygote", "rehearse"), ("nemo_xtoken.data.packing", "data")])
def test_layer_of(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
