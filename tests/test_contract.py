"""The one rule: policies depend on the contract only; omnisim never imports backends; backends never import the
simulator. And the conformance checker catches what it promises to catch."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omnisim.core import Assignment, Phase
from omnisim.core.conformance import ConformanceError, check_proxy_policy
from omnisim.policies import RoundRobin

ROOT = Path(__file__).resolve().parents[1]


def test_core_and_policies_import_with_heavy_dependencies_blocked():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"simpy", "vllm", "torch", "torch_npu", "hydra", "omegaconf", "pandas",
                                          "aiohttp", "backends"} or name.startswith("omnisim.sim"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import omnisim.core, omnisim.policies
        for m in pkgutil.walk_packages(omnisim.policies.__path__, "omnisim.policies."):
            importlib.import_module(m.name)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package,forbidden", [("omnisim", "backends"), ("backends", "omnisim.sim")])
def test_layering(package, forbidden):
    offenders = [f"{p.relative_to(ROOT)} imports {n}" for p in (ROOT / package).rglob("*.py")
                 for n in _imports(p) if n == forbidden or n.startswith(forbidden + ".")]
    assert not offenders, offenders


def test_checker_catches_bad_policies():
    class Unknown(RoundRobin):
        def schedule(self, phase, queue, view):
            return [Assignment(w.request.id, "nowhere") for w in queue]

    class Twice(RoundRobin):
        def schedule(self, phase, queue, view):
            out = super().schedule(phase, queue, view)
            return out + out[:1]

    class Mutates(RoundRobin):
        def schedule(self, phase, queue, view):
            out = super().schedule(phase, queue, view)
            if queue:
                queue.pop()
            return out

    class Unseeded(RoundRobin):  # a class-level counter leaks state between instances (and sweep runs)
        made = 0

        def __init__(self, seed=0):
            super().__init__(seed)
            Unseeded.made += 1
            self.calls = Unseeded.made

        def schedule(self, phase, queue, view):
            c = view.candidates(phase)
            return [Assignment(w.request.id, c[self.calls % len(c)].id) for w in queue] if c else []

    class DecodeOnPrefill(RoundRobin):
        def schedule(self, phase, queue, view):
            pre = [s for s in view.instances if s.healthy and s.role.value == "prefill"]
            if phase is Phase.DECODE and pre:
                return [Assignment(w.request.id, pre[0].id) for w in queue]
            return super().schedule(phase, queue, view)

    for bad, why in [(Unknown, "not a healthy instance"), (Twice, "twice"), (Mutates, "mutated"),
                     (Unseeded, "same seed"), (DecodeOnPrefill, "prefill instance")]:
        with pytest.raises(ConformanceError, match=why):
            check_proxy_policy(bad)
    check_proxy_policy(RoundRobin)


def test_checker_flags_wall_clock_and_global_randomness(tmp_path, monkeypatch):
    (tmp_path / "sneaky_policy.py").write_text(textwrap.dedent("""
        import random, time
        from omnisim.core import Assignment
        class Sneaky:
            def __init__(self, seed=0):
                pass
            def schedule(self, phase, queue, view):
                c = view.candidates(phase)
                time.time()
                random.seed(0)
                return [Assignment(w.request.id, random.choice(c).id) for w in queue] if c else []
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from sneaky_policy import Sneaky

    with pytest.raises(ConformanceError) as e:
        check_proxy_policy(Sneaky)
    assert "wall clock" in str(e.value) and "global randomness" in str(e.value) and "imports time" in str(e.value)


def test_checker_reads_the_helper_modules_a_policy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "sneakypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "clock.py").write_text("import time\n\ndef now():\n    return time.monotonic()\n")
    (pkg / "policy.py").write_text(textwrap.dedent("""
        from omnisim.policies import RoundRobin
        from .clock import now

        class Tidy(RoundRobin):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from sneakypkg.policy import Tidy

    with pytest.raises(ConformanceError, match=r"sneakypkg\.clock:\d+ reads the wall clock"):
        check_proxy_policy(Tidy)
