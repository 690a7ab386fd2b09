import pytest

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.transport.topics import Topics

pytestmark = pytest.mark.unit


def test_topic_scheme():
    t = Topics("kitchen")
    assert t.round == "fleetune/kitchen/round"
    assert t.global_adapter == "fleetune/kitchen/adapter/global"
    assert t.update("pi-1") == "fleetune/kitchen/update/pi-1"
    assert t.all_updates == "fleetune/kitchen/update/+"
    assert t.status("pi-1") == "fleetune/kitchen/status/pi-1"
    assert t.device_of("fleetune/kitchen/update/pi-1") == "pi-1"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "with space", "x" * 65])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(ConfigError, match="id"):
        Topics("fleet").update(bad)
    with pytest.raises(ConfigError):
        Topics(bad)


def test_device_of_refuses_foreign_topics():
    with pytest.raises(ConfigError, match="not a device topic"):
        Topics("a").device_of("fleetune/b/update/x")
