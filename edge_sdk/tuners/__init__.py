"""Tuners change an adapter on local text behind one interface (:class:`LocalTuner`): backprop
(the reference, torch), zeroth-order (forward-only, seed uploads) and mixture (coefficients over
the fleet's basis)."""

from fleetune.edge_sdk.tuners.base import Job, LocalTuner, Tuned, make_tuner

__all__ = ["Job", "LocalTuner", "Tuned", "make_tuner"]
