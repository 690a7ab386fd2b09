"""``fleetune fleet provision``: everything a fleet needs to trust its parts, in one folder.

::

    OUT/ca/ca.crt, ca.key          the fleet's certificate authority (keep ca.key offline)
    OUT/broker/mosquitto.conf      mutual TLS, ACL, retained state saved on every change
    OUT/broker/acl                 who may publish and read which topic
    OUT/server/server.toml         [server] with the TLS files and the signing key
    OUT/server/signing-key.pem     the fleet's Ed25519 key: every push is signed with it
    OUT/devices/<id>/device.toml   [device] id, [sync] broker, TLS files, the pinned fleet key

Each device folder is self-contained: copy it to the device and run
``fleetune device --config device.toml``. Running ``provision`` again with more device ids
reuses the CA, the keys and the folders that exist and adds the new devices; nothing is
overwritten. A certificate's common name is the device id; the broker makes it the client's
user name and client id, and the ACL's ``%u`` patterns confine each device to its own topics.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetune.edge_sdk.errors import ConfigError
from fleetune.edge_sdk.signing import Signer
from fleetune.edge_sdk.store import atomic_write
from fleetune.edge_sdk.transport.topics import ROOT, check_id
from fleetune.server.broker import BrokerTls, mosquitto_conf

SERVER_NAME = "fleetune-server"  # the server's certificate common name (its MQTT user)
KEYS_STATE = "keys.json"  # {"version", "keys"}: the trusted keys, next to the signing key
KEYS_SIGNED = "keys.signed"  # the signed key list the server publishes (retained) at start


@dataclass(frozen=True)
class Provisioned:
    root: Path
    fleet: str
    devices: list[str]  # every device folder now under devices/
    added: list[str]  # those this call created
    fleet_key: str  # the public key devices pin (hex)

    @property
    def broker_tls(self) -> BrokerTls:
        return broker_tls(self.root)

    def device_dir(self, device: str) -> Path:
        return self.root / "devices" / device


def broker_tls(root: Path) -> BrokerTls:
    """The broker's files in a provisioned folder."""
    b = root / "broker"
    return BrokerTls(root / "ca" / "ca.crt", b / "broker.crt", b / "broker.key", b / "acl")


def acl(fleet: str, server: str = SERVER_NAME) -> str:
    """The server reads and writes the whole fleet; a device (``%u``: its certificate's common
    name) publishes its own update, mixture and status, and reads the shared pushes and its own
    personal adapter (each also in chunks). Anything else is denied by the broker."""
    p = f"{ROOT}/{fleet}"
    device = [
        ("write", "update/%u"),
        ("write", "mixture/%u"),
        ("readwrite", "status/%u"),
        ("read", "round"),
        ("read", "keys"),
        ("read", "adapter/global"),
        ("read", "adapter/global/seeds"),
        ("read", "adapter/basis"),
        ("read", "adapter/basis/prior"),
        ("read", "adapter/device/%u"),
        ("read", "adapter/cluster/+"),
        ("read", "secagg/unmask"),
        ("write", "secagg/reveal/%u"),
    ]
    # each topic with its chunk topics (edge_sdk/transport/chunks.py: {topic}/c/{i})
    lines = [f"pattern {how} {p}/{topic}{tail}" for how, topic in device for tail in ("", "/c/+")]
    return "\n".join([f"user {server}", f"topic readwrite {p}/#", "", *lines, ""])


def provision(
    out: str | Path,
    fleet: str,
    devices: list[str],
    host: str = "127.0.0.1",
    port: int = 8883,
    days: int = 3650,
    broker_save_every_s: int = 0,
) -> Provisioned:
    check_id("fleet", fleet)
    for device in devices:
        check_id("device", device)
        if device == SERVER_NAME:
            raise ConfigError(f"device id {device!r} is the server's name; pick another")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"device ids repeat: {sorted(devices)}")
    root = Path(out).resolve()
    for sub in ("ca", "broker/data", "server", "devices"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _check_fleet(root, fleet, host, port)
    ca_key, ca_cert = _authority(root / "ca", fleet, days)
    issue = _Issuer(ca_key, ca_cert, days)
    ca_pem = (root / "ca" / "ca.crt").read_bytes()

    broker = root / "broker"
    issue.once(broker, "broker", host, server=True)
    (broker / "acl").write_text(acl(fleet))
    conf = mosquitto_conf(
        host, port, broker / "data", broker_tls(root), save_every_s=broker_save_every_s
    )
    (broker / "mosquitto.conf").write_text(conf)

    server = root / "server"
    issue.once(server, "client", SERVER_NAME)
    _write_once(server / "ca.crt", ca_pem)
    signer = Signer.load_or_create(server / "signing-key.pem")
    (server / "fleet-key.pub").write_text(signer.public_hex + "\n")
    (server / "server.toml").write_text(
        _toml(
            "server",
            fleet=fleet,
            host=host,
            port=port,
            state_dir="state",
            signing_key="signing-key.pem",
            tls_ca="ca.crt",
            tls_cert="client.crt",
            tls_key="client.key",
        )
    )
    added = []
    for device in devices:
        folder = root / "devices" / device
        if (folder / "device.toml").exists():
            continue
        folder.mkdir(exist_ok=True)
        issue.once(folder, "client", device)
        _write_once(folder / "ca.crt", ca_pem)
        (folder / "device.toml").write_text(
            _toml("device", id=device)
            + "\n"
            + _toml(
                "sync",
                host=host,
                port=port,
                fleet=fleet,
                fleet_key=signer.public_hex,
                tls_ca="ca.crt",
                tls_cert="client.crt",
                tls_key="client.key",
            )
        )
        added.append(device)
    every = sorted(p.name for p in (root / "devices").iterdir() if (p / "device.toml").exists())
    return Provisioned(root, fleet, every, added, signer.public_hex)


def rotate_key(signing_key: str | Path, drop_old: bool = False) -> tuple[str, int]:
    """A new fleet signing key at ``signing_key``; the old one signs the new key list
    (``keys.signed``, published retained by the server at its next start), so devices that
    trust the old key adopt the new one without being touched. The old key is kept as
    ``signing-key.v<N>.pem``; it stays trusted unless ``drop_old`` (a key that leaked).
    A device offline across two rotations no longer holds a key that signed the newest list:
    it needs provisioning again. Returns (new public key hex, key list version)."""
    path = Path(signing_key)
    if not path.exists():
        raise ConfigError(f"no signing key at {path}: run `fleetune fleet provision` first")
    old = Signer.load_or_create(path)
    state = path.parent / KEYS_STATE
    held = json.loads(state.read_text()) if state.exists() else {}
    keys = [bytes.fromhex(k) for k in held.get("keys", [])] or [old.public]
    version = int(held.get("version", 0)) + 1
    retired = path.with_name(f"{path.stem}.v{version - 1}.pem")
    os.replace(path, retired)
    new = Signer.load_or_create(path)
    keys = [k for k in keys if not drop_old or k != old.public] + [new.public]
    atomic_write(path.parent / KEYS_SIGNED, old.key_list(keys, version))
    atomic_write(state, json.dumps({"version": version, "keys": [k.hex() for k in keys]}).encode())
    (path.parent / "fleet-key.pub").write_text(new.public_hex + "\n")
    return new.public_hex, version


# -- certificates ---------------------------------------------------------------------------------
class _Issuer:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, days: int):
        self.key, self.cert, self.days = key, cert, days

    def once(self, folder: Path, kind: str, name: str, server: bool = False) -> None:
        """``folder/<kind>.crt`` and ``.key`` for ``name``, unless they exist."""
        crt, key_path = folder / f"{kind}.crt", folder / f"{kind}.key"
        if crt.exists() and key_path.exists():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(_names(name)), False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write_key(key_path, key)
        atomic_write(crt, cert.public_bytes(serialization.Encoding.PEM))


def _authority(folder: Path, fleet: str, days: int):
    crt, key_path = folder / "ca.crt", folder / "ca.key"
    if crt.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not the EC key fleetune's CA uses")
        return key, x509.load_pem_x509_certificate(crt.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fleetune {fleet} CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    atomic_write(crt, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _names(host: str) -> list[x509.GeneralName]:
    """The broker's names: ``host`` (an IP or a DNS name) and loopback."""
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    try:
        ip = ipaddress.ip_address(host)
        if str(ip) != "127.0.0.1":
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    return names


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _write_once(path: Path, data: bytes) -> None:
    if not path.exists():
        atomic_write(path, data)


def _check_fleet(root: Path, fleet: str, host: str, port: int) -> None:
    """A folder provisioned before belongs to one fleet and one broker address."""
    marker = root / "fleet.json"
    want = {"fleet": fleet, "host": host, "port": port}
    if marker.exists():
        have = json.loads(marker.read_text())
        if have != want:
            raise ConfigError(f"{root} was provisioned for {have}, not {want}")
        return
    marker.write_text(json.dumps(want) + "\n")


def _toml(table: str, **values: object) -> str:
    lines = [f"[{table}]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
