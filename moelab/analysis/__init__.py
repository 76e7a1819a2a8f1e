"""Routing statistics and verdicts, heatmaps, run reports."""
