"""Differential privacy accounting, budget enforcement, signing keys and the privacy ledger.

Submodules are imported where used (nothing here), so light users do not pay for Opacus.
"""
