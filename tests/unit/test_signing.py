"""Signed pushes: verification, refusals by name, key rotation, the server's key file."""

import contextlib
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetune.edge_sdk.errors import ConfigError, PayloadError
from fleetune.edge_sdk.signing import Keyring, Signer, parse_key, unwrap

pytestmark = pytest.mark.unit


def _signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def test_a_signed_message_opens_and_anything_else_is_refused_by_name():
    # Prepare
    fleet, stranger = _signer(), _signer()
    keyring = Keyring([fleet.public])
    signed = fleet.sign(b"adapter v3")
    tampered = bytearray(signed)
    tampered[-1] ^= 1
    # Execute / Assert
    assert keyring.open(signed, "adapter") == b"adapter v3"
    for payload, reason in (
        (b"adapter v3", "is not signed"),
        (stranger.sign(b"adapter v3"), "not a fleet key"),
        (bytes(tampered), "bad signature"),
        (signed[:50], "too short"),
    ):
        with pytest.raises(PayloadError, match=reason):
            keyring.open(payload, "adapter")
    # a device that pinned no key takes the message as it is
    assert unwrap(signed, None, "adapter") == unwrap(b"adapter v3", None, "adapter")


def test_keys_rotate_through_a_list_the_old_key_signed_and_never_back():
    # Prepare
    old, new = _signer(), _signer()
    keyring = Keyring([old.public])
    rotation = old.key_list([new.public], version=1)
    # Execute
    adopted = keyring.rotate(rotation)
    replayed = keyring.rotate(rotation)
    # Assert: the new key is trusted, the old one no longer, and the replay changes nothing
    assert (adopted, replayed) == (True, False)
    assert keyring.open(new.sign(b"m"), "push") == b"m"
    with pytest.raises(PayloadError, match="not a fleet key"):
        keyring.open(old.sign(b"m"), "push")
    with pytest.raises(PayloadError, match="not a fleet key"):
        keyring.rotate(old.key_list([old.public], version=2))  # the retired key cannot return


def test_the_server_key_is_created_once_owner_only_and_reloaded(tmp_path):
    first = Signer.load_or_create(tmp_path / "k.pem")
    again = Signer.load_or_create(tmp_path / "k.pem")
    assert first.public == again.public
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        Signer.load_or_create(tmp_path / "bad.pem")
    assert parse_key(first.public_hex) == first.public
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_key("abcd")


KEYRING = Keyring([_signer().public])


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300))
def test_any_bytes_open_or_raise_payload_error(payload):
    for call in (lambda: KEYRING.open(payload, "x"), lambda: KEYRING.rotate(payload)):
        with contextlib.suppress(PayloadError):
            call()
