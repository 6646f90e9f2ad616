"""Built models in cluster storage: built once, fetched everywhere else.

`tanbr build-moe --publish URI` uploads a cached model (weights, merge statistics, and the config
recording their sha256) to `<URI>/<cache dir name>/`, the config last: it is the commit point, as in
the local cache. A process on another machine (a merger, a Tune trial) calls `load_model`: its own
machine's cache, else the published copy, downloaded beside the cache, verified file by file (size
and sha256 against the config) and only then renamed into place. It never builds: a model that is in
neither place is an error that names both, since a silent build costs 20–35 minutes on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tanbr_ray.fileio import open_storage
from tanbr_ray.moe.config import MoEConfig, default_models_dir
from tanbr_ray.moe.store import CONFIG, FORMAT, load_moe, read_meta


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def publish(cache_dir: str | os.PathLike, uri: str) -> str:
    """Upload a cached model to `<uri>/<its dir name>/` (config last); returns where it went."""
    d = Path(cache_dir)
    meta = read_meta(d)
    load_moe(d)  # publish only what verifies here
    fs, base = open_storage(uri)
    dest = _join(base, d.name)
    fs.create_dir(dest, recursive=True)
    for name in [*meta["files"], CONFIG]:  # the config, which names the others' checksums, last
        with fs.open_output_stream(_join(dest, name)) as out, open(d / name, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
    return _join(uri, d.name)


def _download(fs, remote: str, local: Path, size: int | None = None, sha256: str | None = None) -> None:
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(remote) as src, open(local, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
    except FileNotFoundError:
        raise ValueError(f"published model file {remote}: missing") from None
    if size is not None and local.stat().st_size != size:
        raise ValueError(f"published model file {remote}: size {local.stat().st_size} != recorded {size} "
                         "(truncated or altered)")
    if sha256 is not None and h.hexdigest() != sha256:
        raise ValueError(f"published model file {remote}: sha256 mismatch (altered or corrupt)")


def fetch(cfg: MoEConfig, uri: str, models_dir: str | os.PathLike | None = None) -> Path:
    """Download and verify the published copy of `cfg`'s model into this machine's cache; ValueError
    naming the remote file if anything is missing, truncated or altered (nothing cached is touched)."""
    fs, base = open_storage(uri)
    src = _join(base, cfg.cache_dirname())
    cache = Path(models_dir or default_models_dir())
    final = cache / cfg.cache_dirname()
    if final.exists():
        raise ValueError(f"{final}: a cached copy exists but does not load; remove it to fetch {uri} again")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".fetch-{cfg.cache_dirname()}-"))
    try:
        _download(fs, _join(src, CONFIG), tmp / CONFIG)
        try:
            meta = json.loads((tmp / CONFIG).read_text())
            files = {n: (int(f["bytes"]), str(f["sha256"])) for n, f in meta["files"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"published model file {_join(src, CONFIG)}: corrupt config ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise ValueError(f"published model file {_join(src, CONFIG)}: not a {FORMAT} model")
        for name, (size, sha) in files.items():
            _download(fs, _join(src, name), tmp / name, size, sha)
        try:
            os.rename(tmp, final)  # whole, verified, or not at all
        except OSError:
            if not (final / CONFIG).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process of this machine fetched it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_model(cfg: MoEConfig, models_dir: str | os.PathLike | None = None, source: str | None = None):
    """The model for a process that must not build it: this machine's cache, else the copy published
    at `source`, fetched and verified. Returns (model, where it came from: "cache" or "fetched").

    Build precision is the builder's choice (the presets build in bf16 where the hardware has bf16
    units), and it is part of the cache key; so that a process finds the model whatever device it
    sees, the same settings built at the other precision are accepted when the asked one is absent."""
    from tanbr_ray.moe.build import load_cached

    cache = Path(models_dir or default_models_dir())
    variants = [cfg, cfg.model_copy(update={"bf16": not cfg.bf16})]
    found = next((v for v in variants if (cache / v.cache_dirname() / CONFIG).exists()), None)
    how = "cache"
    if found is None:
        if source is None:
            raise ValueError(f"model {cfg.cache_dirname()}: not in this machine's cache ({cache}) and no model "
                             "source to fetch it from; run `tanbr build-moe --publish URI` and pass that URI as "
                             "model_source")
        errors = []
        for v in variants:
            try:
                fetch(v, source, models_dir)
                found = v
                break
            except ValueError as exc:
                errors.append(str(exc))
                if "missing" not in str(exc):
                    raise  # present but corrupt: never fall back past a bad copy
        if found is None:
            raise ValueError(f"model {cfg.cache_dirname()}: not in this machine's cache ({cache}) nor published "
                             f"at {source} ({'; '.join(errors)})")
        how = "fetched"
    return load_cached(found, cache / found.cache_dirname())[0], how
