"""The stage-layout integer program (Eq. 3), solved with Pyomo + GLPK (or HiGHS).

    minimise z  s.t.  z >= a n_i + b N_{i-1} + c  (every stage i),  sum n_i = L,  n_i >= 1 integer

A stacking operator that copies a block of B layers (step.stack_block) adds, for every growth
stage i >= 2, an integer auxiliary m_i >= 1 with n_i = B m_i, and needs the first stage to be at
least one block deep (n_1 >= B), so each growth is a whole number of copies of a block that exists.

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


def solve_layout(costs: Costs, num_layers: int, stages: int, solver: str, multiple: int = 1) -> Layout:
    """Optimal layout of `num_layers` over `stages` stages (each adds >= 1 layer).

    multiple > 1: every growth (stage 2 on) adds a multiple of it, and stage 1 at least it.
    """
    if not 1 <= stages <= num_layers:
        raise ValueError(f"need 1 <= stages <= num_layers, got {stages} and {num_layers}")
    if stages == 1:
        return Layout([num_layers], costs.stage_bytes(num_layers, 0), solver)
    if not layout_feasible(num_layers, stages, multiple):
        raise ValueError(f"{stages} stages of whole {multiple}-layer blocks need at least {stages * multiple} layers, got "
                         f"{num_layers}")
    raw = _solve_ilp(costs, num_layers, stages, solver, multiple)
    peak = max(layout_peaks(costs, raw))
    layers = canonical_layout(costs, num_layers, stages, peak, multiple)
    return Layout(layers, max(layout_peaks(costs, layers)), solver)


def layout_feasible(num_layers: int, stages: int, multiple: int) -> bool:
    """Whether some layout exists: n_1 = L - B (K - 1) >= B is the deepest first stage."""
    return stages == 1 or num_layers >= stages * multiple


def layout_allowed(layers: list[int], multiple: int) -> bool:
    """Whether a (pinned) layout obeys the block constraint."""
    return layers[0] >= multiple and all(n % multiple == 0 for n in layers[1:]) if len(layers) > 1 else True


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


def _solve_ilp(costs: Costs, num_layers: int, stages: int, solver: str, multiple: int = 1) -> list[int]:
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
    if multiple > 1:  # whole blocks: n_i = B m_i for every growth, and a first stage one block deep
        m.G = pyo.RangeSet(2, stages)
        m.blocks = pyo.Var(m.G, domain=pyo.PositiveIntegers, bounds=(1, num_layers // multiple))
        m.whole = pyo.Constraint(m.G, rule=lambda m, i: m.n[i] == multiple * m.blocks[i])
        m.first = pyo.Constraint(expr=m.n[1] >= multiple)
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


def canonical_layout(costs: Costs, num_layers: int, stages: int, peak: int, multiple: int = 1) -> list[int]:
    """Among layouts whose every stage fits `peak` bytes, the one adding the most layers earliest.

    Backward pass: reach[i][N] says whether stages i+1..K can grow N layers to exactly L under the
    peak. Forward pass: each stage takes the largest count that keeps the end reachable. O(K L):
    stage i's candidates n = lo, lo + s, ... (s = 1 for stage 1, the block multiple after it) are
    counted with a prefix sum taken along stride s.
    """
    L = num_layers
    reach = [[False] * (L + 1) for _ in range(stages + 1)]
    reach[stages][L] = True
    for i in range(stages, 0, -1):  # stage i adds n >= lo layers (in steps of s) on top of N = N_{i-1}
        s, lo = _candidates(i, multiple)
        strided = [0] * (L + 1)  # strided[x] = reach[i][x] + reach[i][x - s] + ...
        for x in range(L + 1):
            strided[x] = reach[i][x] + (strided[x - s] if x >= s else 0)
        for old in range(L):
            top = _max_new(costs, old, peak, L - old)
            if top >= lo:
                last = old + lo + (top - lo) // s * s
                reach[i - 1][old] = strided[last] - strided[old + lo - s] > 0
    if not reach[0][0]:
        raise ValueError(f"no layout of {L} layers in {stages} stages fits {peak} bytes")
    layers, old = [], 0
    for i in range(1, stages + 1):
        s, lo = _candidates(i, multiple)
        new = next(n for n in range(_max_new(costs, old, peak, L - old), lo - 1, -1)
                   if (n - lo) % s == 0 and reach[i][old + n])
        layers.append(new)
        old += new
    return layers


def _candidates(stage: int, multiple: int) -> tuple[int, int]:
    """(stride, smallest count) of the layers stage `stage` may add: stage 1 any count >= the block,
    later stages whole blocks."""
    return (1, multiple) if stage == 1 else (multiple, multiple)


def _max_new(costs: Costs, old: int, peak: int, limit: int) -> int:
    """Largest n <= limit with stage_bytes(n, old) <= peak (stage bytes grow with n), or 0."""
    per_layer = costs.stage_bytes(1, old) - costs.stage_bytes(0, old)
    room = peak - costs.stage_bytes(0, old)
    return max(0, min(limit, room // per_layer))


def pinned_layout(costs: Costs, layers: list[int]) -> Layout:
    return Layout(list(layers), max(layout_peaks(costs, layers)), "pinned")
