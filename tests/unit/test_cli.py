import pytest

from fleetune.cli import build_parser, main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "value,address",
    [
        ("10.0.0.5:1884", ("10.0.0.5", 1884)),
        ("127.0.0.1", ("127.0.0.1", 1883)),
        ("broker.local:", ("broker.local", 1883)),
        (":2000", ("127.0.0.1", 2000)),
    ],
)
def test_demo_broker_port_defaults_to_1883(value, address):
    # Execute
    args = build_parser().parse_args(["demo", "--broker", value])
    # Assert
    assert args.broker == address


@pytest.mark.parametrize("value", ["127.0.0.1:mqtt", "127.0.0.1:0", "127.0.0.1:70000"])
def test_demo_bad_broker_port_is_an_argparse_error(value, capsys):
    # Execute
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--broker", value])
    # Assert
    assert exit_info.value.code == 2
    assert "not a number from 1 to 65535" in capsys.readouterr().err


def test_demo_mqtt5_on_the_embedded_broker_is_refused_at_once(capsys):
    # Execute
    code = main(["demo", "--protocol", "5"])
    # Assert
    assert code == 2
    assert "embedded amqtt broker speaks MQTT 3.1.1 only" in capsys.readouterr().err
