"""The multi-objective search over plans: Optuna ask/tell with a sensitivity prior, the Pareto front.

``params`` turns a trial into a plan (and checks constraints), ``objectives`` lists what is
optimised, ``prior`` and ``sampler`` hold the sensitivity prior, ``driver`` runs the study over
an executor, ``pareto`` computes the front and its hypervolume from the storage, ``report``
prints and plots it.
"""
from .driver import Callback, SearchConfig, SearchReport, search
from .pareto import Front, front_from_storage, hypervolume
from .params import plan_from_trial

__all__ = ["Callback", "Front", "SearchConfig", "SearchReport", "front_from_storage", "hypervolume",
           "plan_from_trial", "search"]
