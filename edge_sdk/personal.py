"""The personalization session of a mixture device: take the fleet's retained basis (and the
prior it starts from), search coefficients inside the engine, upload them (K x G floats), and run
the personalized adapter the server pushes back. Without an answer the device keeps running its
own mix, which it saved before uploading."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from fleetune.edge_sdk.adapters.lora import init_lora
from fleetune.edge_sdk.errors import PayloadError, TransportError
from fleetune.edge_sdk.evaluation import DeviceReport
from fleetune.edge_sdk.protocol import Basis, MixtureUpload, PersonalAdapter, Prior
from fleetune.edge_sdk.tuners.base import Job

if TYPE_CHECKING:
    from fleetune.edge_sdk.client import EdgeClient
    from fleetune.edge_sdk.data import ClientData, ClientText

log = logging.getLogger(__name__)


def personalize(client: EdgeClient, item: ClientText, data: ClientData) -> DeviceReport:
    """Personalize once from the fleet's basis; return what was measured."""
    topics, backend = client.topics, client.backend
    report = DeviceReport(client.device, item.client)
    backend.set_adapter(init_lora(client.spec, client.base))
    report.ppl_base = client.evaluate(data.heldout)
    transport = client.connect()
    report.bytes_up += client.deliver()
    transport.subscribe(topics.basis_prior)  # first: its retained copy comes first
    transport.subscribe(topics.basis)
    transport.subscribe(topics.personal(client.device))
    priors: dict[int, np.ndarray] = {}  # basis version -> the coefficients to start from
    basis: Basis | None = None
    coef: np.ndarray | None = None
    upload = ""  # sha256 of this device's mixture upload: the server's answer names it
    wait = client.config.sync.round_wait_s
    while True:
        msg = client.next_push(wait, report)
        if msg is None and basis is None:
            raise TransportError(f"{client.device}: no basis from the server for {wait:.0f} s")
        if msg is None:
            log.warning(
                "%s: no answer from the server for %.0f s: keeping the local mix (perplexity %.1f)",
                client.device,
                wait,
                report.ppl_local,
            )
            report.ppl_final = report.ppl_local
            return report
        report.bytes_down += len(msg.payload)
        try:
            payload = client.receive(msg)
            if payload is None:
                continue
            if msg.topic == topics.basis_prior:
                prior = Prior.decode(payload)
                priors[prior.version] = prior.prior
            elif msg.topic == topics.basis and basis is None:
                offered = Basis.decode(payload)
                if offered.version in priors:
                    offered = offered.with_prior(priors[offered.version])
                offered.check(client.spec, client.base)
                basis = offered
            elif msg.topic == topics.personal(client.device) and basis is not None:
                answer = PersonalAdapter.decode(payload, client.fleet)
                if answer.mixture_sha256 != upload:
                    continue  # the answer to an earlier upload (retained)
                backend.set_adapter(answer.tensors)
                client.store.save_adapter(payload)
                report.ppl_final = client.evaluate(data.heldout)
                report.history.append({"round": 1, "ppl_global": report.ppl_final})
                log.info(
                    "%s: personalized adapter from basis v%d (coefficients %s): perplexity "
                    "%.1f → %.1f",
                    client.device,
                    basis.version,
                    np.round(np.asarray(coef).reshape(-1), 2).tolist(),
                    report.ppl_base,
                    report.ppl_final,
                )
                return report
            else:
                continue
        except PayloadError as err:
            client.refuse(msg, err)
            continue
        if basis is not None and coef is None:  # search, outside the message checks
            coef, upload = search_and_upload(client, data, basis, report)


def search_and_upload(
    client: EdgeClient, data: ClientData, basis: Basis, report: DeviceReport
) -> tuple[np.ndarray, str]:
    """Search, keep the mix on disk, queue the coefficients; returns them and the upload's
    sha256."""
    t = client.config.tuning

    def progress(step: int, value: float) -> None:
        log.info("%s mixture: step %d/%d validation loss %.3f", client.device, step, t.steps, value)

    start = init_lora(client.spec, client.base)
    tuned = client.tuner.tune(
        client.backend, data, start, Job(client.device, basis=basis), progress
    )
    assert tuned.coef is not None  # the mix tuner always returns coefficients
    report.ppl_local = client.evaluate(data.heldout)
    log.info(
        "%s: mixture of %d adapters after %d steps: perplexity %.1f → %.1f",
        client.device,
        basis.k,
        tuned.metrics["steps"],
        report.ppl_base,
        report.ppl_local,
    )
    local = PersonalAdapter(tuned.adapter, basis_version=basis.version, local=True)
    client.store.save_adapter(local.encode(client.fleet, "f32", sender=client.device))
    upload = MixtureUpload(
        client.device,
        basis.version,
        tuned.coef,
        len(data.train),
        heldout_loss=math.log(report.ppl_local),
        metrics={k: tuned.metrics[k] for k in ("val_loss", "val_loss_start", "steps")},
        zo=tuned.seeds,
        zo_pool_size=t.zo().pool_size,
    )
    payload = upload.encode(client.fleet)
    client.store.put(client.topics.mixture(client.device), payload)
    report.bytes_up += client.deliver()
    return tuned.coef, hashlib.sha256(payload).hexdigest()
