"""The ``bridge`` extra is installable with ``requirements/constraints.txt``: no pin contradicts a requirement.

A plain ``pip install -c requirements/constraints.txt ".[bridge]"`` cannot run on a CPU machine (its
fast-hadamard-transform dependency is an sdist whose build needs torch and CUDA), so this checks what
pip's resolver would: every package pinned in the constraints that megatron-bridge 0.6.2 needs,
directly or through megatron-core[dev,mlm] and the pinned packages' own requirements, satisfies every
requirement specifier on it (read from the installed distributions' metadata).  Before the fix the
constraints pinned transformers 5.23.0 (Bridge requires ≤ 5.12.1) and OpenTelemetry 1.45
(megatron-core[dev] requires ~=1.43.0).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[1] / "requirements" / "constraints.txt"
ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "platform_release": "", "platform_version": ""}


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _requirements(dist: str, extras: tuple[str, ...]) -> list[Requirement]:
    out = []
    for r in md.requires(dist) or []:
        req = Requirement(r)
        if req.marker is None or any(req.marker.evaluate({**ENV, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def test_constraints_satisfy_megatron_bridge_requirement_tree():
    pytest.importorskip("megatron.bridge")
    pins = _pins()
    assert pins["megatron-bridge"] == md.version("megatron-bridge") == "0.6.2"
    conflicts, seen = [], set()
    todo = [("megatron-bridge", ()), ("megatron-core", ("dev", "mlm"))]
    while todo:
        dist, extras = todo.pop()
        if (dist, extras) in seen:
            continue
        seen.add((dist, extras))
        try:
            reqs = _requirements(dist, extras)
        except md.PackageNotFoundError:
            continue  # not installed here (CUDA-only or optional): nothing pinned to compare
        for req in reqs:
            name = canonicalize_name(req.name)
            if name in pins:
                if pins[name] not in req.specifier:
                    conflicts.append(f"{dist}{list(extras) or ''} requires {req} but the constraints pin {name}=={pins[name]}")
                todo.append((name, tuple(sorted(req.extras))))
    assert not conflicts, "\n".join(conflicts)


def test_bridge_extra_pins_transformers_in_bridges_range():
    pins = _pins()
    (spec,) = [Requirement(r).specifier for r in md.requires("megatron-bridge") if Requirement(r).name == "transformers"]
    assert pins["transformers"] in spec and md.version("transformers") == pins["transformers"]
