"""Training: the jitted step, data, the experiment runner."""
