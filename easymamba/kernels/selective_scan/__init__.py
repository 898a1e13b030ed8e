"""Mamba-1's selective scan: `reference.py` (the recurrence, the associative-scan form, one decode step); no kernel."""
