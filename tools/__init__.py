"""The tools that simulate a run (plan.py, roofline.py) and the loss plots (plot.py)."""
