"""Embed a fleetune device in an app: personalize on the owner's text, follow the fleet's rounds.

fleetune export onnx                              # once, on a machine with the torch extra;
                                                  # --out DIR + [device] bundle = DIR elsewhere
fleetune server --config examples/fleet.toml --embedded-broker &
python examples/embed_device.py my_notes.txt
"""

import logging
import sys
from pathlib import Path

from fleetune.edge_sdk import EdgeClient, load_config
from fleetune.edge_sdk.data import ClientText

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
config = load_config("examples/fleet.toml")
text = Path(sys.argv[1]).read_text(encoding="utf-8")

with EdgeClient(config) as client:
    report = client.run(ClientText(config.device.id, text))

print(
    f"held-out perplexity {report.ppl_base:.1f} → {report.ppl_final:.1f}, "
    f"{report.bytes_up} bytes up, {report.bytes_down} bytes down"
)
