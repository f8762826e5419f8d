"""Tools beside training: the planner (tools/plan.py, train.py --plan) and the loss plots (tools/plot.py)."""
