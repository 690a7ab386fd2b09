"""fleetune: personalize a small LLM on the edge device and federate what devices learn.

- ``fleetune.edge_sdk``: the device SDK (the bottom layer; it imports neither of the others)
- ``fleetune.server``: the aggregation service
- ``fleetune.models``: the model toolchain (Hugging Face → device bundles; needs torch)
- ``fleetune.sim``: a whole fleet simulated on one machine (``fleetune demo``)
"""
