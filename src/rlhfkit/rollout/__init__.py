"""Sampling from a policy, scoring samples, and the evaluations built on them."""
