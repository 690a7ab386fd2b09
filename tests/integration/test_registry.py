"""The registry on SQLite and on a real PostgreSQL: the same behaviour, and a server that
resumes from either."""

import time

import numpy as np
import pytest

from fleetune.edge_sdk.adapters.lora import init_lora
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.transport.memory import MemoryBroker
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.registry import FLEET, Registry
from tests.conftest import started, tiny_manifest
from tests.integration.test_server_rounds import SPEC, _server, _update

pytestmark = pytest.mark.integration


def test_the_registry_keeps_what_the_server_asks_it_to(database):
    # Prepare
    registry = Registry(database)
    # Execute: every kind of row, upserts twice
    registry.seen("d1")
    registry.seen("d2")
    registry.seen("d1", "offline")
    registry.open_round(1)
    registry.log_update(1, "d1", 100, 10, True)
    registry.log_update(1, "d2", 5, 0, False, "malformed")
    registry.close_round(1, 1, 1, 1)
    registry.open_round(2)  # opened, never closed: a crash
    registry.add_adapter(0, 0, "00" * 32, "/a/v0")
    registry.add_adapter(1, 1, "11" * 32, "/a/v1")
    registry.add_adapter(1, 1, "12" * 32, "/a/v1b")  # written again after a crash
    registry.add_basis(1, 1, 2, "d1,d2", "/b/v1")
    registry.log_mixture("d1", 1, "[[0.5]]", 2.5, 0)
    registry.log_mixture("d3", 1, reason="coef out of range")
    registry.log_refused_push("d2", "bad signature")
    registry.log_refused_push("d2", "bad signature")  # its retained status, again
    registry.record_privacy("d1", 1, 4.7, 1e-5)
    registry.record_privacy("d1", 2, 6.9, 1e-5)
    registry.record_privacy(FLEET, 2, 6.9, 1e-5)
    registry.log_perplexity(1, "d1", 80.5)
    registry.log_update(1, "d3", 7, 0, False, "duplicate")
    registry.log_batch(
        2, [("d4", 9, 3, True, ""), ("d4", 9, 0, False, "duplicate")], [("d4", 70.0)]
    )
    claims = [
        registry.claim(1, "d1", "w0"),
        registry.claim(1, "d1", "w1"),
        registry.claim(1, "d2", "w1"),
    ]
    leases = [registry.lead("c1", 30), registry.lead("c2", 30), registry.lead("c1", 30)]
    registry.close()
    again = Registry(database)  # and read it back from a new connection
    # Assert
    devices = {d: s for d, (_, s) in again.devices().items()}
    assert devices == {"d1": "offline", "d2": "online", "d4": "online"}
    assert again.device_states() == {"offline": 1, "online": 2}
    assert again.rejections() == [
        (1, "d2", "malformed"),
        (1, "d3", "duplicate"),
        (2, "d4", "duplicate"),
    ]
    assert again.rejections(last=1) == [(2, "d4", "duplicate")] and again.refused_count() == 3
    assert again.perplexities() == {"d1": [(1, 80.5)], "d4": [(2, 70.0)]}
    assert [r[0] for r in again.rounds()] == [1, 2] and again.rounds()[0][3:] == (1, 1, 1)
    assert claims == [True, False, True] and again.claimed(1) == 2
    assert leases == [True, False, True]
    again.resign("c1")
    assert again.lead("c2", 30)
    assert again.last_round() == 2 and again.open_round_number() == 2
    assert again.latest_adapter() == (1, "/a/v1b") and again.adapter_round(1) == 1
    assert again.latest_basis() == (1, "/b/v1") and again.basis_path(1) == "/b/v1"
    assert again.basis_path(7) is None and again.adapter_round(7) is None
    assert again.mixtures() == [("d1", 1, "[[0.5]]", 2.5, 0)]
    assert again.refused_mixtures() == [("d3", "coef out of range")]
    assert again.refused_pushes() == [("d2", "bad signature")]
    assert again.privacy() == {"d1": (2, 6.9), FLEET: (2, 6.9)}
    last_seen = again.devices()["d1"][0]
    assert abs(last_seen - time.time()) < 5  # to the second: not a 4-byte float
    again.close()


def test_a_server_on_either_database_resumes_from_it(tmp_path, database):
    # Prepare: a round on the database
    broker = MemoryBroker()
    server = _server(tmp_path, broker, quorum=1, database=database)
    device = broker.client("d")
    device.connect()
    thread = started(server.run, name="server")
    device.publish(Topics("t").update("d1"), _update("d1", 2.0))
    thread.join(20)
    server.close()
    # Execute: a new server on the same state
    again = _server(tmp_path, broker, quorum=1, database=database)
    # Assert
    assert (again.version, again.first_round) == (1, 2)
    init = init_lora(SPEC, tiny_manifest())
    for name, value in again.current.items():
        np.testing.assert_allclose(value, init[name] + 2.0)
    again.close()


def test_a_database_that_cannot_be_reached_is_a_config_error(postgres):
    url = postgres.url("no_such_database")
    with pytest.raises(ConfigError, match=r"cannot open the registry database .*no_such_database"):
        Registry(url)


def test_processes_that_open_a_new_postgresql_registry_together_do_not_collide(postgres):
    # Prepare: a fresh database, as when the coordinator and its workers start at once
    import threading

    url = postgres.create_database("together")
    errors: list[BaseException] = []
    go = threading.Barrier(6)

    def open_it() -> None:
        go.wait()
        try:
            Registry(url).close()
        except BaseException as err:  # reported below
            errors.append(err)

    # Execute
    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Assert
    assert not errors, errors[0]
