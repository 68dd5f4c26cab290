"""Measuring a store: accuracy on a test set (ranked choice or generation), the continual-learning record, lm-eval suites, CI gates."""
