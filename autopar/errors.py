"""Errors a user can cause. Each message says what was wrong and what to do."""


class AutoparError(ValueError):
    """Base class for every error caused by user input (model, mesh, plan, pins)."""


class TraceError(AutoparError):
    """The model could not be captured into an fx graph."""


class PlanError(AutoparError):
    """A plan cannot be found, loaded or applied."""


class SolverTimeLimit(PlanError):
    """The solver reached its time limit before finding any solution."""
