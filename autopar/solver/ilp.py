"""PuLP mechanics the intra-op ILP is written in: linearized edges, solver choice, status.

`pair_triggers` and friends turn "the edge's ends run strategies i and j" into an
expression that is 1 exactly then, with the tight sum constraints of Alpa and
autoparallel (a pair with no valid reshard gets no variable, so the sums forbid it);
`at_least_one` charges a shared reshard once; `solve` runs HiGHS when highspy is
installed, else PuLP's bundled CBC, and maps the status to a result or an error.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings

import pulp

from autopar.errors import PlanError, SolverTimeLimit


def safe(text: str) -> str:
    """A PuLP-safe name for a variable or constraint."""
    return "".join(c if c.isalnum() else "_" for c in text)


def at_least_one(prob: pulp.LpProblem, triggers: list, name: str):
    """An expression that is 1 when any trigger is (a new [0, 1] variable if several)."""
    if len(triggers) == 1:
        return triggers[0]
    paid = prob.add_variable(name, lowBound=0, upBound=1)
    for n, trigger in enumerate(triggers):
        prob += paid >= trigger, f"{name}_{n}"
    return paid


def diagonal_triggers(prob, variables, table, name) -> dict:
    """Both ends share a key (corresponding nodes of consecutive blocks): same choice."""
    triggers = {}
    for i, var in enumerate(variables):
        if (i, i) not in table:
            prob += var == 0, f"no_reshard_{name}_{i}"
        else:
            triggers[i, i] = var
    return triggers


def one_sided_triggers(prob, src_vars, dst_vars, table, name) -> dict:
    """One end has a single candidate: the edge is linear in the other end's choice."""
    free_vars, fixed_is_src = (dst_vars, True) if src_vars is None else (src_vars, False)
    triggers = {}
    for k, var in enumerate(free_vars):
        pair = (0, k) if fixed_is_src else (k, 0)
        if pair not in table:
            prob += var == 0, f"no_reshard_{name}_{k}"
        else:
            triggers[pair] = var
    return triggers


def pair_triggers(prob, src_vars, dst_vars, table, name) -> dict:
    """e[i, j] >= 0 with sum_j e[i, j] = x_src[i] and sum_i e[i, j] = x_dst[j]."""
    e = {pair: prob.add_variable(f"e_{name}_{pair[0]}_{pair[1]}", lowBound=0) for pair in table}
    for i, var in enumerate(src_vars):
        terms = [e[i, j] for j in range(len(dst_vars)) if (i, j) in e]
        prob += pulp.lpSum(terms) == var, f"src_{name}_{i}"
    for j, var in enumerate(dst_vars):
        terms = [e[i, j] for i in range(len(src_vars)) if (i, j) in e]
        prob += pulp.lpSum(terms) == var, f"dst_{name}_{j}"
    return e


@functools.cache
def _highs_available() -> bool:
    """HiGHS prints a banner on its first instance; take it here, with stdout muted."""
    if not pulp.HiGHS().available():
        return False
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return True


def _solver(time_limit_s: float | None):
    """HiGHS when highspy is installed (faster), else PuLP's bundled CBC."""
    if _highs_available():
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s)
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC but still ships it
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)


def solve(prob: pulp.LpProblem, time_limit_s: float | None, what: str) -> tuple[str, float]:
    """Solve; ("optimal" or a not-proven-optimal note, seconds), else an error naming `what`."""
    start = time.perf_counter()
    prob.solve(_solver(time_limit_s))
    elapsed = time.perf_counter() - start
    solution = pulp.LpSolution[prob.sol_status]
    if solution == "Optimal Solution Found":
        return "optimal", elapsed
    if solution == "Solution Found":
        return "feasible, not proven optimal (time limit)", elapsed
    if solution == "No Solution Found" and pulp.LpStatus[prob.status] == "Not Solved":
        raise SolverTimeLimit(
            f"the sharding ILP {what} found no solution within its time limit; "
            "raise time_limit_s (or leave it unset)"
        )
    raise PlanError(
        f"no tensor-parallel sharding {what} fits (solver status: "
        f"{pulp.LpStatus[prob.status]}); use more devices, a larger pipeline degree, more "
        "microbatches or a smaller batch"
    )
