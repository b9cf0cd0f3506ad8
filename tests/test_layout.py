"""The package's seams: a solver registered from outside through the documented protocol, and
the run-time modules depending on the window helpers, not on the kernels' reference contract.

Oracles: the sequential sampler (float64, same chain, same noise) for a registered solver's
answer; a float64 ``einsum`` for the Gram row the engine fuses for a solver that asks for one.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import deqkern
from deqkern.ops.window import RowSlide
from deqkern.solvers import base as solvers_base

S = 10
PACKAGE = Path(deqkern.__file__).parent


@dataclass(frozen=True)
class DampedConfig:
    """Options of the test solver: ``x <- x + step (G(x) - x)``."""

    step: float = 0.8

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1:
            raise ValueError(f"step: expected 0 < step <= 1, got {self.step}")


class DampedSolver:
    """A damped Picard solver that also keeps its last residual as a one-slot history, so the
    engine fuses ``<f, f_prev>`` into the scan (the protocol's optional ``gram_history``)."""

    def __init__(self, config: DampedConfig, batch: int, width: int, dim: int, device, dtype) -> None:
        self.step = config.step
        self.hist = torch.zeros(1, batch, width, dim, device=device, dtype=dtype)
        self.grams: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (gram, f, hist) per round

    def gram_history(self) -> torch.Tensor:
        return self.hist

    def update(self, x, g, f, f_sq, gram, live):
        self.grams.append((gram.clone(), f.clone(), self.hist[0].clone()))
        self.hist[0].copy_(f)
        return x + self.step * f

    def shift(self, delta: torch.Tensor) -> None:
        # each row keeps the residual of its own timestep; rows entering the window start at 0
        RowSlide(delta, self.hist.shape[2]).apply(self.hist[0], 0.0)


@pytest.fixture
def damped(monkeypatch):
    # a copy of the registry for this test: monkeypatch restores the original (without the solver)
    monkeypatch.setattr(solvers_base, "_REGISTRY", dict(solvers_base._REGISTRY))
    solvers: list[DampedSolver] = []

    def factory(config, batch, width, dim, device, dtype):
        solvers.append(DampedSolver(config, batch, width, dim, device, dtype))
        return solvers[-1]

    deqkern.register_solver("test-damped", DampedConfig, factory)
    return solvers


def _chain(ddim, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 2, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(S, 2, 2, 2, 4, generator=g, dtype=torch.float64)
    return x, noise, deqkern.Schedule.from_diffusers(ddim, S, eta=0.5)


@pytest.mark.parametrize("window", [S, 4])
def test_registered_solver_solves_the_chain_to_the_sequential_answer(gmm64, ddim, damped, window):
    x, noise, sched = _chain(ddim, seed=window)
    want = deqkern.sample_sequential(gmm64, x, sched, noise, execution="eager").x0
    tol = 1e-8
    res = deqkern.sample(gmm64, x, sched, solver="test-damped", solver_options={"step": 0.8}, tol=tol,
                         max_iters=400, window=window, noise=noise, execution="eager")
    assert bool(res.converged.all()) and len(damped) == 1  # one solver, built by the registered factory
    # relative stop at 1e-8 per row, amplified by at most S contractive steps
    assert rel_err(res.x0, want) < 1e-6
    # the fused Gram row the engine handed over: <f, f_prev> per row, against float64 einsum
    nonzero = 0
    for gram, f, prev in damped[0].grams:
        assert gram.shape == (*f.shape[:2], 1)
        want_gram = torch.einsum("bwd,bwd->bw", f.double(), prev.double())
        assert (gram[..., 0].double() - want_gram).norm() <= 1e-12 * want_gram.norm()  # float64 sums over D
        nonzero += bool(want_gram.norm() > 0)
    assert nonzero > 1


def test_registered_solver_options_are_validated(gmm64, ddim, damped):
    x, noise, sched = _chain(ddim, seed=0)
    with pytest.raises(ValueError, match="step: expected 0 < step <= 1"):
        deqkern.sample(gmm64, x, sched, solver="test-damped", solver_options={"step": 2.0}, noise=noise)
    with pytest.raises(TypeError, match="config_cls: expected a dataclass"):
        deqkern.register_solver("test-bad", dict, lambda *a: None)


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports from (``from m import ...`` and ``import m``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("module", ["engine.py", "solvers/anderson.py", "solvers/picard.py", "solvers/base.py",
                                    "inversion/adjoint.py"])
def test_run_time_modules_do_not_import_the_reference_contract(module):
    assert "deqkern.ops.reference" not in _imports(PACKAGE / module)


def _kernel_sources() -> dict[str, ast.Module]:
    from deqkern.kernels import KERNEL_MODULES

    return {name: ast.parse((PACKAGE / "kernels" / f"{name}.py").read_text()) for name in KERNEL_MODULES}


def test_every_kernel_module_holds_its_kernel_and_launcher():
    """``deqkern.kernels.KERNEL_MODULES`` lists all five; each defines ``_<name>_kernel`` and a
    public launcher, and :mod:`deqkern.ops.triton_ops` gathers exactly those launchers."""
    sources = _kernel_sources()
    assert len(sources) == 5
    launchers = set()
    for name, tree in sources.items():
        functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert f"_{name}_kernel" in functions, name
        public = {f for f in functions if not f.startswith("_")}
        assert len(public) == 1, (name, public)
        launchers |= public
    index = ast.parse((PACKAGE / "ops" / "triton_ops.py").read_text())
    exported = {a.name for node in index.body if isinstance(node, ast.ImportFrom) and node.module != "__future__"
                for a in node.names}
    assert exported == launchers


def test_kernel_strides_have_full_names():
    """Integer stride arguments read ``stride_<tensor>_<dim>`` in every kernel signature."""
    for name, tree in _kernel_sources().items():
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.decorator_list):
            args = [a.arg for a in fn.args.args]
            short = [a for a in args if a.startswith("s_")]
            assert not short, (name, fn.name, short)
            assert all(a.count("_") >= 2 for a in args if a.startswith("stride")), (name, fn.name)


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists its packages by name: every folder of deqkern with an ``__init__.py``
    must be there, or the installed wheel cannot import it (as deqkern.pipelines once could not)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]  # the source checkout (PACKAGE may be the installed copy)
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    source = root / "deqkern"
    found = {"deqkern." + str(p.parent.relative_to(source)).replace("/", ".") for p in source.rglob("__init__.py")
             if p.parent != source}
    assert found - {"deqkern.kernels"} <= listed, sorted(found - listed)
