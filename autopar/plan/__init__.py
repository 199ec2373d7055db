"""The Plan (a typed value saved as JSON) and its plain-text summary."""

from autopar.cost.pricing import Collective
from autopar.plan.value import SCHEMA_VERSION, Cost, Plan, PlanNode, Stage

__all__ = ["SCHEMA_VERSION", "Collective", "Cost", "Plan", "PlanNode", "Stage"]
