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
