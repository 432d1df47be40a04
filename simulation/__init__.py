"""Simulation: Flower's engine, in this process, for any app pair (:func:`run_apps`)."""

from pollinate.simulation.apps import run_apps

__all__ = ["run_apps"]
