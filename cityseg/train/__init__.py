"""Training: setup, the loop, one step, optimizer and schedule, losses, EMA, resume."""
