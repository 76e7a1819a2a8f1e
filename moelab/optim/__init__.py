"""Optimizers (Muon + AdamW), the rule for which parameter gets which, and LR schedules."""
