"""mpq.search: assign one format per layer under a hard memory budget (an Optuna study, warm-
started from the exact optimum of the additive model), then a second study that measures plans
at the budget for real (measured.py).

The only place in mpq that imports optuna; it returns plain data, never a Study.
"""

from mpq.search.exact import ExactPoint, exact_front
from mpq.search.measured import MeasuredResult, Neighbours, measured_search
from mpq.search.pareto import (Candidate, SearchResult, evaluate_plan, expand, open_storage, pareto_front, pareto_front_3d,
                               search_plans, spread, tie, uniform_plan)

__all__ = ["Candidate", "ExactPoint", "MeasuredResult", "Neighbours", "measured_search", "SearchResult", "evaluate_plan", "exact_front", "expand", "open_storage", "pareto_front",
           "pareto_front_3d", "search_plans", "spread", "tie", "uniform_plan"]
