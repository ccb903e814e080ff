"""mtrobust-fast: fast adversarial attacks and robustness sweeps for multi-task vision models."""
__version__ = "0.1.0"
