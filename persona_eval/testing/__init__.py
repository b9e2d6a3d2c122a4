"""Helpers for testing persona-eval itself: a tiny trainable model with a known, planted persona effect."""
