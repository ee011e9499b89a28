"""The stage-layout ILP (Eq. 3) against an independent exact oracle on random problems.

The oracle is a minimax dynamic program over (stage, layers so far), itself checked against brute-force
enumeration of all compositions for small L. Costs come from the memory model (`Costs.stage_bytes`),
which tests/test_memory_plan.py checks against the paper's formulas and a real LlamaForCausalLM.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from stepc.compiler.layout import solve_layout
from stepc.compiler.load import parse_spec
from stepc.compiler.memory import Costs, exact_costs, layout_peaks, paper_costs

NUM_CASES = 220
HIGHS_EVERY = 7  # ~30 of the cases are also solved and oracle-checked with HiGHS


@dataclass(frozen=True)
class Case:
    label: str
    costs: Costs
    num_layers: int
    stages: int


def exact_case_costs(rng: random.Random, d: int, r: int) -> Costs:
    """Costs of a random real LLaMA shape (GQA, odd MLP widths, tied or not, bf16 or fp32)."""
    d += d % 2  # rotary embeddings need an even head dimension
    heads = rng.choice([h for h in range(1, 65) if d % h == 0 and (d // h) % 2 == 0])
    kv = rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
    inter = rng.choice(["", f"intermediate_size = {rng.randint(1, 4 * d)}"])
    spec = parse_spec(f"""
[experiment]
name = "oracle"
[model]
hidden_size = {d}
num_layers = 1
num_attention_heads = {heads}
num_key_value_heads = {kv}
{inter}
vocab_size = {max(512, rng.randint(300, 60000))}
tie_embeddings = {rng.choice(["true", "false"])}
[memory]
accounting = "exact"
stages = 1
[step]
lora_rank = {min(r, d)}
[train]
precision = "{rng.choice(["bf16", "fp32"])}"
global_batch_tokens = 40960
[data]
tokenizer = "bpe-512"
""", "oracle.toml")
    return exact_costs(spec)


def make_cases() -> list[Case]:
    rng = random.Random(20240607)
    cases = []
    for i in range(NUM_CASES):
        num_layers = rng.randint(2, 48)
        kind = i % 4  # every K from 1 to L, with K = L and K = L - 1 explicitly represented
        stages = {0: num_layers, 1: num_layers - 1}.get(kind, rng.randint(1, num_layers)) or 1
        d, r = rng.randint(64, 4096), rng.randint(1, 256)
        if rng.random() < 0.5:
            costs, accounting = paper_costs(d, r), "paper"
        else:
            costs, accounting = exact_case_costs(rng, d, r), "exact"
        cases.append(Case(f"{i:03d}-{accounting}-d{d}-L{num_layers}-K{stages}-r{r}", costs, num_layers, stages))
    return cases


CASES = make_cases()


# ----------------------------------------------------------------------------- the oracles


def stage_table(costs: Costs, num_layers: int) -> list[list[int]]:
    """table[before][new] = bytes of a stage adding `new` layers above `before` frozen ones."""
    return [[costs.stage_bytes(new, before) for new in range(num_layers - before + 1)] for before in range(num_layers + 1)]


def dp_optimum(costs: Costs, num_layers: int, stages: int) -> int:
    """min over layouts of max stage bytes: best[N] after k stages = min_n max(best_prev[N - n], cost(n, N - n))."""
    table = stage_table(costs, num_layers)
    best: dict[int, int] = {0: 0}
    for _ in range(stages):
        nxt: dict[int, int] = {}
        for before, value in best.items():
            for new in range(1, num_layers - before + 1):
                peak = max(value, table[before][new])
                if peak < nxt.get(before + new, peak + 1):
                    nxt[before + new] = peak
        best = nxt
    return best[num_layers]


def compositions(num_layers: int, stages: int):
    for cuts in itertools.combinations(range(1, num_layers), stages - 1):
        bounds = (0, *cuts, num_layers)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def brute_force(costs: Costs, num_layers: int, stages: int) -> tuple[int, list[list[int]]]:
    """The optimal peak and every layout that attains it."""
    scored = [(max(layout_peaks(costs, layers)), layers) for layers in compositions(num_layers, stages)]
    best = min(peak for peak, _ in scored)
    return best, [layers for peak, layers in scored if peak == best]


# ----------------------------------------------------------------------------- tests


def test_cases_cover_the_requested_space():
    assert len(CASES) >= 200
    assert any(c.stages == c.num_layers for c in CASES) and any(c.stages == c.num_layers - 1 for c in CASES)
    assert any(c.stages == 1 for c in CASES)
    assert {c.label.split("-")[1] for c in CASES} == {"paper", "exact"}
    assert min(c.num_layers for c in CASES) <= 4 and max(c.num_layers for c in CASES) >= 40


def test_dp_oracle_matches_brute_force():
    rng = random.Random(7)
    for _ in range(150):
        num_layers = rng.randint(1, 11)
        stages = rng.randint(1, num_layers)
        costs = paper_costs(rng.randint(64, 4096), rng.randint(1, 256))
        assert dp_optimum(costs, num_layers, stages) == brute_force(costs, num_layers, stages)[0]


def check_layout(case: Case, solver: str, optimum: int) -> list[int]:
    layout = solve_layout(case.costs, case.num_layers, case.stages, solver)
    assert len(layout.layers) == case.stages
    assert sum(layout.layers) == case.num_layers
    assert all(isinstance(n, int) and n >= 1 for n in layout.layers)
    assert max(layout_peaks(case.costs, layout.layers)) == layout.peak_bytes  # reported peak is the layout's
    assert layout.peak_bytes == optimum
    return layout.layers


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_ilp_matches_oracle(case):
    optimum = dp_optimum(case.costs, case.num_layers, case.stages)
    glpk = check_layout(case, "glpk", optimum)
    highs = solve_layout(case.costs, case.num_layers, case.stages, "highs")
    # the tie-break is a pure function of the optimum: both solvers give the identical layout
    assert highs.layers == glpk and highs.peak_bytes == optimum
    if int(case.label[:3]) % HIGHS_EVERY == 0:
        check_layout(case, "highs", optimum)


@pytest.mark.parametrize("solver", ["glpk", "highs"])
def test_tie_break_is_the_lexicographically_largest_optimum(solver):
    """Among equally good layouts the compiler adds the most layers earliest (small L: check all of them)."""
    rng = random.Random(11)
    ties = 0
    for _ in range(40):
        num_layers = rng.randint(2, 10)
        stages = rng.randint(2, num_layers)
        costs = paper_costs(rng.randint(64, 4096), rng.randint(1, 256))
        best, optimal = brute_force(costs, num_layers, stages)
        ties += len(optimal) > 1
        assert solve_layout(costs, num_layers, stages, solver).layers == max(optimal)
    assert ties > 0  # the check exercised at least one tie


def test_ilp_handles_byte_scale_costs():
    """Peaks of ~1e13 bytes (a huge model with a large fixed part) still come out exact."""
    costs = Costs(layer_params=12 * 16384**2 + 2 * 16384, adapter_params=19 * 256 * 16384,
                  fixed_params=2 * 256000 * 16384, frozen_bytes=2)
    for stages in (2, 3, 7):
        optimum = dp_optimum(costs, 96, stages)
        for solver in ("glpk", "highs"):
            assert solve_layout(costs, 96, stages, solver).peak_bytes == optimum
