"""mpq.search: assign one format per layer under a hard memory budget (an Optuna study).

The only place in mpq that imports optuna; it returns plain data, never a Study.
"""

from mpq.search.pareto import (Candidate, SearchResult, evaluate_plan, greedy_path, pareto_front, search_plans, spread,
                               uniform_plan)

__all__ = ["Candidate", "SearchResult", "evaluate_plan", "greedy_path", "pareto_front", "search_plans", "spread",
           "uniform_plan"]
