"""Evaluation: loss, perplexity, token accuracy and bits per byte."""
