"""``fleetune export onnx``: a causal LM whose LoRA adapter is ONE flat float32 graph input.

The graphs take the adapter as ``adapter`` (shape ``[N]``, ``LoraSpec.layout`` order, the one
:class:`~fleetune.edge_sdk.adapters.lora.flat.FlatLayout`) while the base weights are baked in,
so an engine can evaluate, and by finite differences train, any adapter without re-exporting.
LoRA forward: ``y = W x + scale * B (A x)`` with ``scale = alpha / r``.

- ``hooks.py``: the forward hooks that add the LoRA path to the target projections
- ``graphs.py``: the loss graph and the KV-cache decoder graph, and the one export call
- ``quantize.py``: weight-only int8 of the base weights (the adapter path stays fp32)
- ``bundle.py``: the device bundle: graphs, tokenizer, ``fleetune-bundle.json``
"""

from fleetune.models.onnx.bundle import export_onnx

__all__ = ["export_onnx"]
