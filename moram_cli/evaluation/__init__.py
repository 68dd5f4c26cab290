"""Measuring a store: accuracy by ranked choice or by exact match of generation."""
