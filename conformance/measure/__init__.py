"""Measurement: speed and memory ratios in one process (bench), and the budget files that judge them."""
