"""Policies: what generates completions and learns from rewards."""
