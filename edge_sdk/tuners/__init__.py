"""Tuners change an adapter on local text: backprop (reference), zeroth-order (coming)."""
