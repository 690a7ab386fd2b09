"""A base's Hugging Face copy → GGUF files llama.cpp runs, and LoRA adapters → GGUF adapters it
hot-swaps.

``export_base_gguf`` runs llama.cpp's own ``convert_hf_to_gguf.py`` (f16) and quantizes with
``llama_model_quantize`` (q8_0, q4_0); results are cached under ``cache_dir()/gguf``. The converter
is not on PyPI: it ships in the llama-cpp-python sdist, which is downloaded once with ``pip
download`` unless ``$FLEETUNE_CONVERT_HF_TO_GGUF`` (or the ``converter`` argument) names a local
copy. ``write_lora_gguf`` writes an adapter with the ``gguf`` package directly, fast enough to run
once per zeroth-order step.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from fleetune.edge_sdk.bundle import Bundle, cache_dir, default_bundle_dir
from fleetune.edge_sdk.errors import BackendError, BackendUnavailable, ConfigError
from fleetune.edge_sdk.manifest import BaseManifest

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
CONVERTER_ENV = "FLEETUNE_CONVERT_HF_TO_GGUF"
# llama_ftype values (LLAMA_FTYPE_MOSTLY_*)
QUANTS = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}
_SENTENCEPIECE_STUB = """\
class SentencePieceProcessor:  # fleetune stub: the converter imports it before checking files
    def __init__(self, *args, **kwargs):
        raise ImportError("sentencepiece is not installed")
"""


def gguf_cache() -> Path:
    return cache_dir() / "gguf"


def _llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception as err:
        raise BackendUnavailable(
            "exporting GGUF needs llama.cpp: pip install 'fleetune[llamacpp]'"
        ) from err


def find_converter(converter: str | Path | None = None) -> Path:
    """Path of llama.cpp's ``convert_hf_to_gguf.py``: ``converter``, else
    ``$FLEETUNE_CONVERT_HF_TO_GGUF``, else the copy unpacked from the llama-cpp-python sdist into
    the cache (downloaded with ``pip download`` the first time)."""
    given = converter or os.environ.get(CONVERTER_ENV)
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / "convert_hf_to_gguf.py"
        if not path.is_file():
            raise ConfigError(f"convert_hf_to_gguf.py not found at {path}")
        return path
    version = _llama_cpp_version()
    root = gguf_cache() / f"llama.cpp-{version}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".converter.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not script.is_file():
            _unpack_converter(version, root)
    return script


def _unpack_converter(version: str, root: Path) -> None:
    log.info("downloading the llama-cpp-python %s sdist for convert_hf_to_gguf.py", version)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            tmp,
            f"llama-cpp-python=={version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise BackendUnavailable(
                f"cannot download the llama-cpp-python {version} sdist for convert_hf_to_gguf.py "
                f"({done.stderr.strip()[-300:]}); set ${CONVERTER_ENV} to a llama.cpp checkout"
            )
        extract_converter(sdists[0], root)


def extract_converter(sdist: Path, root: Path) -> Path:
    """Unpack ``convert_hf_to_gguf.py`` with its ``conversion/`` and ``gguf-py/`` packages from a
    llama-cpp-python sdist into ``root``; returns the script."""
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    staging = root.with_name(root.name + ".tmp")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name.removeprefix(prefix)
            wanted = rel.startswith(("convert_hf_to_gguf", "conversion/", "gguf-py/"))
            if member.name.startswith(prefix) and wanted and member.isfile():
                member.name = rel
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
                    tar.extract(member, staging, filter="data")
                else:
                    tar.extract(member, staging)
    if not (staging / "convert_hf_to_gguf.py").is_file():
        raise BackendUnavailable(f"{sdist.name} holds no vendor/llama.cpp converter")
    staging.rename(root)
    return root / "convert_hf_to_gguf.py"


def _converter_env() -> dict[str, str]:
    """The converter imports sentencepiece even for BPE tokenizers; stub it when it is absent."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if importlib.util.find_spec("sentencepiece") is None:
        stub = gguf_cache() / "stubs"
        stub.mkdir(parents=True, exist_ok=True)
        if not (stub / "sentencepiece.py").exists():
            (stub / "sentencepiece.py").write_text(_SENTENCEPIECE_STUB)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub), env.get("PYTHONPATH")) if p)
    return env


def adopt_tokenizer(converted: Path, source: Path, out: Path) -> Path:
    """Copy ``converted`` to ``out`` with the ``tokenizer.*`` metadata of ``source``.

    A base dequantized from a GGUF has the tokenizer.json transformers rebuilt from it, which
    the converter takes for a sentencepiece vocabulary; the source GGUF holds the real one."""
    import gguf

    conv, src = gguf.GGUFReader(converted), gguf.GGUFReader(source)
    arch = conv.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch)
    try:
        for reader, keep in ((conv, False), (src, True)):
            for field in reader.fields.values():
                name = field.name
                if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF."):
                    continue
                if name.startswith("tokenizer.") != keep:
                    continue
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        for tensor in conv.tensors:
            writer.add_tensor_info(
                tensor.name,
                tensor.data.shape,
                tensor.data.dtype,
                tensor.data.nbytes,
                tensor.tensor_type,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in conv.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=conv.endianess)
    finally:
        writer.close()
    return out


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 1) -> Path:
    """``llama_model_quantize`` of ``src`` into ``dst`` (one of ``QUANTS``)."""
    if quant not in QUANTS:
        raise ConfigError(f"GGUF quantization {quant!r} is not one of {sorted(QUANTS)}")
    try:
        from fleetune.edge_sdk.backends.llamacpp import init_llama

        llama_cpp = init_llama()
    except ImportError as err:
        raise BackendUnavailable(
            "quantizing GGUF needs llama.cpp: pip install 'fleetune[llamacpp]'"
        ) from err
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise BackendError(f"llama_model_quantize({src.name} -> {quant}) returned {rc}")
    return dst


def source_gguf(base: BaseManifest, quant: str) -> Path | None:
    """The base's own source GGUF (``base.source``, e.g. the packaged SmolLM2 Q4_1 file) when its
    ``general.file_type`` already is ``quant``, else ``None``.

    Such a file is the base itself, tokenizer included: re-quantizing its dequantized copy could
    only lose precision."""
    path = Path(base.source)
    if quant not in QUANTS or path.suffix != ".gguf" or not path.is_file():
        return None
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get(gguf.Keys.General.FILE_TYPE)
        file_type = int(field.contents()) if field is not None else None
    except (ImportError, OSError, ValueError) as err:
        log.warning("cannot read the file type of %s (%s): converting instead", path, err)
        return None
    return path if file_type == QUANTS[quant] else None


def export_base_gguf(
    base: BaseManifest,
    quant: str = "q8_0",
    out_dir: str | Path | None = None,
    converter: str | Path | None = None,
    threads: int = 1,
) -> Path:
    """The base as a GGUF file of ``quant`` (``f16``, ``q8_0``, ``q4_0``, ``q4_1``), cached by
    base hash.

    From SmolLM2-135M's fp32 copy (one core): f16 in 15-20 s, then q8_0 in ~1.5 s, q4_0 in
    ~0.8 s. Held-out perplexity on hamlet/HAMLET: torch fp32 126.6, f16 126.6, q8_0 126.5,
    q4_1 127.0 (but no fast x86 kernel: 2x slower than q4_0), q4_0 155.8.

    When the base came from a GGUF of ``quant`` already (``q4_1`` for the packaged SmolLM2), that
    file is returned as is, or copied into ``out_dir`` if one is given (:func:`source_gguf`)."""
    if quant not in QUANTS:
        raise ConfigError(f"GGUF quantization {quant!r} is not one of {sorted(QUANTS)}")
    packaged = source_gguf(base, quant)
    if packaged is not None and out_dir is None:
        return packaged
    out = Path(out_dir) if out_dir else gguf_cache()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{base.name}-{base.short_hash}"
    target = out / f"{stem}-{quant}.gguf"
    if target.exists():
        return target
    if packaged is not None:
        part = target.with_name(target.name + ".part")
        try:
            shutil.copyfile(packaged, part)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        return target
    if not base.hf_dir:
        raise ConfigError(f"base {base.name} has no Hugging Face copy; run prepare_base")
    f16 = out / f"{stem}-f16.gguf"
    with open(out / f".{stem}.lock", "w") as lock:  # one process converts; the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not f16.exists():
            script = find_converter(converter)
            start = time.monotonic()
            tmp = f16.with_suffix(".tmp")
            cmd = [
                sys.executable,
                str(script),
                base.hf_dir,
                "--outtype",
                "f16",
                "--outfile",
                str(tmp),
            ]
            tmp.unlink(missing_ok=True)  # a killed run's leftover must not pass for output
            done = subprocess.run(cmd, capture_output=True, text=True, env=_converter_env())
            if done.returncode != 0 or not tmp.exists():
                tmp.unlink(missing_ok=True)
                raise BackendError(
                    f"convert_hf_to_gguf.py failed on {base.hf_dir} (exit {done.returncode}): "
                    f"{done.stderr.strip()[-800:]}"
                )
            # f16 only ever appears complete: a killed export leaves a .tmp/.part, never a
            # truncated f16 that the next run would take for a finished one
            part = f16.with_name(f16.name + ".part")
            try:
                if base.source.endswith(".gguf") and Path(base.source).is_file():
                    adopt_tokenizer(tmp, Path(base.source), part)
                    os.replace(part, f16)
                else:
                    os.replace(tmp, f16)
            finally:
                tmp.unlink(missing_ok=True)
                part.unlink(missing_ok=True)
            log.info("converted %s to f16 GGUF in %.0f s", base.name, time.monotonic() - start)
        if not target.exists():
            start = time.monotonic()
            tmp = target.with_suffix(".tmp")
            try:
                quantize_gguf(f16, tmp, quant, threads)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("quantized %s to %s in %.0f s", base.name, quant, time.monotonic() - start)
    return target


def export_gguf_bundle(
    base: BaseManifest, quant: str = "q8_0", out_dir: str | Path | None = None
) -> Path:
    """The GGUF device bundle: the base as a ``quant`` GGUF (converted once into the cache, then
    linked or copied), the tokenizer and ``fleetune-bundle.json``."""
    root = Path(out_dir) if out_dir else default_bundle_dir(base.name, "gguf", quant=quant)
    root.mkdir(parents=True, exist_ok=True)
    source = export_base_gguf(base, quant)
    target = root / "model.gguf"
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        part = target.with_name(target.name + ".part")
        part.unlink(missing_ok=True)
        try:
            os.link(source, part)
        except OSError:  # another filesystem
            shutil.copyfile(source, part)
        os.replace(part, target)
    files = {"model": target.name}
    if base.hf_dir and (Path(base.hf_dir) / "tokenizer.json").exists():
        shutil.copyfile(Path(base.hf_dir) / "tokenizer.json", root / "tokenizer.json")
    Bundle(
        root=root, format="gguf", base=base, files=files, quantization={"weights": quant}
    ).write()
    return root
