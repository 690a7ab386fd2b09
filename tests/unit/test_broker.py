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
