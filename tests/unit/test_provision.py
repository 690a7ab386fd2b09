"""``fleetune fleet provision`` and ``rotate-key`` on disk (the broker run is in
tests/integration/test_trust.py)."""

from pathlib import Path

import pytest
from cryptography import x509

from fleetune.cli import main
from fleetune.edge_sdk.config import load_config
from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.signing import Keyring, Signer, parse_key
from fleetune.server.config import load_server_config
from fleetune.server.provision import provision, rotate_key

pytestmark = pytest.mark.unit


def test_provision_writes_configs_that_load_from_anywhere(tmp_path, monkeypatch):
    # Execute: through the CLI, then read the configs from another working directory
    assert main(["fleet", "provision", "--out", str(tmp_path / "f"), "--fleet", "home",
                 "--devices", "pi-a,pi-b", "--port", "18883"]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    device = load_config(tmp_path / "f" / "devices" / "pi-a" / "device.toml")
    server = load_server_config(tmp_path / "f" / "server" / "server.toml")
    # Assert: relative paths resolved next to each config; the device pins the server's key
    tls = device.sync.tls()
    assert tls is not None and tls.cert == str(tmp_path / "f" / "devices" / "pi-a" / "client.crt")
    assert device.device.id == "pi-a" and device.sync.port == 18883
    signer = Signer.load_or_create(server.signing_key)
    assert device.sync.fleet_key == signer.public_hex
    cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=pi-a"
    acl = (tmp_path / "f" / "broker" / "acl").read_text()
    assert "pattern write fleetune/home/update/%u" in acl
    assert "pattern read fleetune/home/adapter/device/%u" in acl


def test_provisioning_again_adds_devices_and_overwrites_nothing(tmp_path):
    first = provision(tmp_path, "home", ["pi-a"])
    key_before = (tmp_path / "devices" / "pi-a" / "client.key").read_bytes()
    ca_before = (tmp_path / "ca" / "ca.crt").read_bytes()
    again = provision(tmp_path, "home", ["pi-a", "pi-b"])
    assert again.added == ["pi-b"] and again.devices == ["pi-a", "pi-b"]
    assert (tmp_path / "devices" / "pi-a" / "client.key").read_bytes() == key_before
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == ca_before
    assert again.fleet_key == first.fleet_key


@pytest.mark.parametrize(
    ("fleet", "devices", "message"),
    [
        ("home", ["fleetune-server"], "the server's name"),
        ("home", ["pi-a", "pi-a"], "repeat"),
        ("home", ["pi/a"], "device id"),
        ("other", ["pi-a"], "was provisioned for"),
    ],
)
def test_provisioning_refuses_what_would_confuse_the_acl(tmp_path, fleet, devices, message):
    provision(tmp_path, "home", ["pi-z"])
    with pytest.raises(ConfigError, match=message):
        provision(tmp_path, fleet, devices)


def test_a_rotated_key_is_announced_under_the_old_one(tmp_path):
    # Prepare: a device that pinned the provisioned key
    done = provision(tmp_path, "home", ["pi-a"])
    key, signed = tmp_path / "server" / "signing-key.pem", tmp_path / "server" / "keys.signed"
    keyring = Keyring([parse_key(done.fleet_key)])
    # Execute: rotate; the device reads the list; rotate again dropping the leaked second key
    new, version = rotate_key(key)
    adopted = keyring.rotate(signed.read_bytes())
    trusted_after_first = set(keyring.keys)
    newer, version2 = rotate_key(key, drop_old=True)
    adopted2 = keyring.rotate(signed.read_bytes())
    # Assert: each list was signed by a key the device held; the dropped key is no longer trusted
    pinned = bytes.fromhex(done.fleet_key)
    assert adopted and version == 1 and trusted_after_first == {pinned, bytes.fromhex(new)}
    assert adopted2 and version2 == 2 and keyring.keys == {pinned, bytes.fromhex(newer)}
    assert Signer.load_or_create(key).public_hex == newer
    assert (tmp_path / "server" / "fleet-key.pub").read_text().strip() == newer
    assert (tmp_path / "server" / "signing-key.v0.pem").exists()
    assert (tmp_path / "server" / "signing-key.v1.pem").exists()


def test_tls_needs_all_three_files(tmp_path):
    from fleetune.edge_sdk.config import SyncConfig

    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match="tls_cert is empty"):
        SyncConfig(tls_ca=str(tmp_path / "ca.crt"))
    with pytest.raises(ConfigError, match="no such file"):
        SyncConfig(tls_ca=str(tmp_path / "ca.crt"), tls_cert="nope.crt", tls_key="nope.key")
