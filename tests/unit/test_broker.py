import pytest

from fleetune.edge_sdk.errors import TransportError
from fleetune.server.broker import MosquittoBroker

pytestmark = pytest.mark.unit


def test_mosquitto_that_fails_to_start_is_reported_with_its_log(tmp_path):
    # Prepare: a stand-in binary that complains on stderr and exits, as mosquitto does on a bad
    # config or a taken port
    binary = tmp_path / "mosquitto"
    binary.write_text("#!/bin/sh\necho 'Error: Address already in use' >&2\nexit 3\n")
    binary.chmod(0o755)
    broker = MosquittoBroker(port=1, binary=str(binary))
    # Execute
    with pytest.raises(TransportError) as raised:
        broker.__enter__()
    # Assert
    assert "exited with code 3" in str(raised.value)
    assert "Error: Address already in use" in str(raised.value)


def test_the_broker_saves_on_every_change_unless_told_to_save_every_n_seconds(tmp_path):
    from fleetune.server.broker import mosquitto_conf

    safe = mosquitto_conf("127.0.0.1", 1883, tmp_path).splitlines()
    timed = mosquitto_conf("127.0.0.1", 1883, tmp_path, save_every_s=5).splitlines()
    assert "autosave_on_changes true" in safe and "autosave_interval 1" in safe
    assert "autosave_on_changes false" in timed and "autosave_interval 5" in timed
