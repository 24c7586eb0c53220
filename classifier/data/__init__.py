"""Turning image sources into prepared datasets, and reading them back."""
