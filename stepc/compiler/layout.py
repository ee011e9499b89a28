"""The stage-layout integer program (Eq. 3), solved with Pyomo + GLPK (or HiGHS).

    minimise z  s.t.  z >= a n_i + b N_{i-1} + c  (every stage i),  sum n_i = L,  n_i >= 1 integer

The model is built in units of one layer's bytes (a ~ 16, b ~ 2-4): with byte-scale coefficients
(~1e10) GLPK reports false infeasibility and HiGHS false optimality, silently. Bytes are recomputed
exactly from the returned integers, and ties between equally good layouts are broken by a pure
function (`canonical_layout`), so the answer does not depend on the solver or its version.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from stepc.compiler.memory import Costs, layout_peaks
from stepc.errors import UserError


@dataclass(frozen=True)
class Layout:
    layers: list[int]  # new layers per stage
    peak_bytes: int
    solver: str  # "glpk", "highs" or "pinned"


def solve_layout(costs: Costs, num_layers: int, stages: int, solver: str) -> Layout:
    """Optimal layout of `num_layers` over `stages` stages (each adds >= 1 layer)."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"need 1 <= stages <= num_layers, got {stages} and {num_layers}")
    if stages == 1:
        return Layout([num_layers], costs.stage_bytes(num_layers, 0), solver)
    raw = _solve_ilp(costs, num_layers, stages, solver)
    peak = max(layout_peaks(costs, raw))
    layers = canonical_layout(costs, num_layers, stages, peak)
    return Layout(layers, max(layout_peaks(costs, layers)), solver)


def _pyomo(solver: str):
    """Pyomo's modelling layer plus just the GLPK plugins: `pyomo.environ` loads every solver
    interface and costs ~0.9 s of CPU, half of a whole compile. HiGHS (appsi) needs the full set."""
    if solver == "glpk":
        try:
            import pyomo.core as pyo
            import pyomo.repn.plugins
            import pyomo.solvers.plugins.converter  # noqa: F401  (registers the LP writer conversion)
            import pyomo.solvers.plugins.solvers.GLPK  # noqa: F401  (registers SolverFactory("glpk"))
            from pyomo.opt import SolverFactory

            pyomo.repn.plugins.load()
            pyo.SolverFactory = SolverFactory
            return pyo
        except (ImportError, AttributeError):  # a Pyomo that moved its plugins: take the slow, complete path
            pass
    import pyomo.environ as pyo

    return pyo


def _solve_ilp(costs: Costs, num_layers: int, stages: int, solver: str) -> list[int]:
    pyo = _pyomo(solver)

    unit = costs.stage_bytes(1, 0) - costs.stage_bytes(0, 0)  # bytes of one trained layer
    a = 1.0
    b = (costs.stage_bytes(0, 1) - costs.stage_bytes(0, 0)) / unit
    c = costs.stage_bytes(0, 0) / unit
    m = pyo.ConcreteModel()
    m.I = pyo.RangeSet(1, stages)
    m.n = pyo.Var(m.I, domain=pyo.PositiveIntegers, bounds=(1, num_layers - stages + 1))
    m.z = pyo.Var(domain=pyo.NonNegativeReals)
    m.total = pyo.Constraint(expr=sum(m.n[i] for i in m.I) == num_layers)
    m.peak = pyo.Constraint(m.I, rule=lambda m, i: m.z >= a * m.n[i] + b * sum(m.n[k] for k in range(1, i)) + c)
    m.obj = pyo.Objective(expr=m.z, sense=pyo.minimize)
    result = _make_solver(pyo, solver).solve(m)
    status = str(result.solver.termination_condition)
    if status != "optimal":
        raise UserError(f"the {solver} solver ended with status '{status}' on a feasible layout problem",
                        key="memory.solver", fix="try memory.solver = \"highs\" (pip install highspy), or pin memory.layers")
    return [int(round(pyo.value(m.n[i]))) for i in m.I]


def _make_solver(pyo, solver: str):
    if solver == "glpk":
        if shutil.which("glpsol") is None:
            raise UserError("the GLPK solver binary 'glpsol' is not installed", key="memory.solver",
                            fix="install it (Debian/Ubuntu: apt-get install glpk-utils; conda: conda install glpk), "
                                "or set memory.solver = \"highs\" after pip install highspy")
        return pyo.SolverFactory("glpk")
    opt = pyo.SolverFactory("appsi_highs")
    if not opt.available(exception_flag=False):
        raise UserError("the HiGHS solver is not available", key="memory.solver",
                        fix="pip install highspy, or set memory.solver = \"glpk\" (apt-get install glpk-utils)")
    opt.highs_options = {"mip_rel_gap": 0.0}
    return opt


def canonical_layout(costs: Costs, num_layers: int, stages: int, peak: int) -> list[int]:
    """Among layouts whose every stage fits `peak` bytes, the one adding the most layers earliest.

    Backward pass: reach[i][N] says whether stages i+1..K can grow N layers to exactly L under the
    peak. Forward pass: each stage takes the largest count that keeps the end reachable. O(K L).
    """
    L = num_layers
    reach = [[False] * (L + 1) for _ in range(stages + 1)]
    reach[stages][L] = True
    for i in range(stages, 0, -1):  # stage i adds n >= 1 layers on top of N = N_{i-1}
        prefix = [0]
        for ok in reach[i]:
            prefix.append(prefix[-1] + ok)
        for old in range(L):
            top = _max_new(costs, old, peak, L - old)
            reach[i - 1][old] = top >= 1 and prefix[old + top + 1] - prefix[old + 1] > 0
    if not reach[0][0]:
        raise ValueError(f"no layout of {L} layers in {stages} stages fits {peak} bytes")
    layers, old = [], 0
    for i in range(1, stages + 1):
        new = next(n for n in range(_max_new(costs, old, peak, L - old), 0, -1) if reach[i][old + n])
        layers.append(new)
        old += new
    return layers


def _max_new(costs: Costs, old: int, peak: int, limit: int) -> int:
    """Largest n <= limit with stage_bytes(n, old) <= peak (stage bytes grow with n), or 0."""
    per_layer = costs.stage_bytes(1, old) - costs.stage_bytes(0, old)
    room = peak - costs.stage_bytes(0, old)
    return max(0, min(limit, room // per_layer))


def pinned_layout(costs: Costs, layers: list[int]) -> Layout:
    return Layout(list(layers), max(layout_peaks(costs, layers)), "pinned")
