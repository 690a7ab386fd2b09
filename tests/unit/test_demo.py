import multiprocessing as mp
import os
import time

import pytest

from fleetune.edge_sdk.errors import FleetuneError
from fleetune.sim.harness import wait_for_results

pytestmark = pytest.mark.unit


def test_first_error_is_raised_at_once_and_stops_the_other_devices():
    # Prepare
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    busy = ctx.Process(target=time.sleep, args=(60,), name="device-0")
    failed = ctx.Process(target=os._exit, args=(0,), name="device-1")
    busy.start()
    failed.start()
    results.put(("device-1", "error", "DataError: too little text"))
    # Execute
    with pytest.raises(FleetuneError, match="device-1: DataError: too little text"):
        wait_for_results(results, {"device-0": busy, "device-1": failed}, poll_s=0.1)
    # Assert
    assert busy.exitcode is not None  # terminated, not left to sleep out its 60 s


def test_a_device_that_dies_without_reporting_is_named_with_its_exit_code():
    # Prepare
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    killed = ctx.Process(target=os._exit, args=(137,), name="device-3")
    killed.start()
    # Execute / Assert
    with pytest.raises(FleetuneError, match="device-3: exited with code 137 without a result"):
        wait_for_results(results, {"device-3": killed}, poll_s=0.1)


def test_ok_results_are_returned():
    # Prepare
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    done = ctx.Process(target=os._exit, args=(0,), name="device-0")
    done.start()
    results.put(("device-0", "ok", {"device": "device-0"}))
    # Execute
    values = wait_for_results(results, {"device-0": done}, poll_s=0.1)
    # Assert
    assert values == [{"device": "device-0"}]


def test_a_demo_of_mixed_windows_gives_each_device_its_window_tuner_and_step():
    """``--window 0,4``: devices take the windows in turn; with ``--tuner window`` the
    full-depth one backprops through every layer at the product's step, the window one through
    its window at the swept one; junk windows are refused by name."""
    import argparse
    from pathlib import Path

    from fleetune.edge_sdk.config import TuningConfig
    from fleetune.sim.cli import windows_list
    from fleetune.sim.harness import WINDOW_LR, Sim

    fleet = TuningConfig()  # the fleet tunes every layer; the demo asked for tuner "window"
    sim = Sim(None, {}, fleet, "torch", ("h", 1), "3.1.1", "f", Path("."), 1.0, 0, (0, 4), "window")
    full, top = (sim.device_tuning(i, fleet) for i in (2, 3))
    assert (full.tuner, full.lora_window, full.lr) == ("backprop", 0, TuningConfig.lr)
    assert (top.tuner, top.lora_window, top.lr) == ("window", 4, WINDOW_LR)
    assert windows_list("0,4") == (0, 4) and windows_list("4") == (4,)
    for junk in ("x", "4,-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole numbers"):
            windows_list(junk)
