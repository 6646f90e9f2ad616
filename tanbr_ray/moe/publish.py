"""Built models in cluster storage: built once, fetched everywhere else.

`tanbr build-moe [--model pool.yaml] --publish URI` uploads a cached model (weights, merge statistics,
a pool's tokenizer files, and the config recording their sha256) to `<URI>/<cache dir name>/`, the config last: it is the commit point, as in
the local cache. A process on another machine (a merger, a Tune trial) calls `load_model` with the model's
cache folder name (content-keyed, so a name is one exact model): its own machine's cache, else the
published copy, downloaded beside the cache, verified file by file (size
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
from tanbr_ray.moe.config import default_models_dir
from tanbr_ray.moe.pool_store import FORMAT as POOL_FORMAT
from tanbr_ray.moe.pool_store import TOKENIZER
from tanbr_ray.moe.store import CONFIG, FORMAT, read_meta

FORMATS = (FORMAT, POOL_FORMAT)  # the built-in MoE, a pool of fine-tunes or a native MoE
UNSIZED_LIMIT = 256 << 20  # bytes: a file the config records no size for (a tokenizer file) is cut off here


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def stored_files(meta: dict) -> dict[str, tuple[int | None, str]]:
    """Every file a cached model's config vouches for (relative path -> (bytes if recorded, sha256)),
    the config itself excluded: weights, statistics and, for a pool, its tokenizer files."""
    try:
        files = {n: (int(f["bytes"]), str(f["sha256"])) for n, f in meta["files"].items()}
        files.update({f"{TOKENIZER}/{n}": (None, str(sha)) for n, sha in meta.get("tokenizer_sha256", {}).items()})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"model config lists its files wrongly ({exc})") from exc
    for n in files:
        parts = Path(n).parts
        if not parts or Path(n).is_absolute() or any(q in (".", "..") for q in parts) or n == CONFIG:
            raise ValueError(f"model config lists a file it may not name: {n!r}")
    return files


def publish(cache_dir: str | os.PathLike, uri: str) -> str:
    """Upload a cached model to `<uri>/<its dir name>/` (config last); returns where it went."""
    from tanbr_ray.moe.resolve import load_dir

    d = Path(cache_dir)
    meta = read_meta(d, FORMATS)
    load_dir(d, "cpu")  # publish only what verifies here
    fs, base = open_storage(uri)
    dest = _join(base, d.name)
    for name in [*stored_files(meta), CONFIG]:  # the config, which names the others' checksums, last
        fs.create_dir(_join(dest, *Path(name).parts[:-1]), recursive=True)
        with fs.open_output_stream(_join(dest, name)) as out, open(d / name, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 22)
    return _join(uri, d.name)


def _download(fs, remote: str, local: Path, size: int | None = None, sha256: str | None = None) -> None:
    h = hashlib.sha256()
    local.parent.mkdir(parents=True, exist_ok=True)
    limit = size if size is not None else UNSIZED_LIMIT
    try:
        with fs.open_input_stream(remote) as src, open(local, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
                if out.tell() > limit:
                    raise ValueError(f"published model file {remote}: larger than "
                                     f"{'recorded' if size is not None else 'any tokenizer file'} ({limit} bytes)")
    except FileNotFoundError:
        raise ValueError(f"published model file {remote}: missing") from None
    if size is not None and local.stat().st_size != size:
        raise ValueError(f"published model file {remote}: size {local.stat().st_size} != recorded {size} "
                         "(truncated or altered)")
    if sha256 is not None and h.hexdigest() != sha256:
        raise ValueError(f"published model file {remote}: sha256 mismatch (altered or corrupt)")


def fetch(name: str, uri: str, models_dir: str | os.PathLike | None = None) -> Path:
    """Download and verify the published model `name` (a cache folder's name) into this machine's
    cache; ValueError naming the remote file if anything is missing, truncated or altered (nothing
    cached is touched)."""
    _check_name(name)
    fs, base = open_storage(uri)
    src = _join(base, name)
    cache = Path(models_dir or default_models_dir())
    final = cache / name
    if final.exists():
        raise ValueError(f"{final}: a cached copy exists but does not load; remove it to fetch {uri} again")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".fetch-{name}-"))
    try:
        _download(fs, _join(src, CONFIG), tmp / CONFIG)
        try:
            meta = json.loads((tmp / CONFIG).read_text())
        except ValueError as exc:
            raise ValueError(f"published model file {_join(src, CONFIG)}: corrupt config ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            raise ValueError(f"published model file {_join(src, CONFIG)}: not a model ({' or '.join(FORMATS)})")
        try:
            files = stored_files(meta)
        except ValueError as exc:
            raise ValueError(f"published model file {_join(src, CONFIG)}: {exc}") from exc
        for rel, (size, sha) in files.items():
            _download(fs, _join(src, rel), tmp / rel, size, sha)
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


def _check_name(name: str) -> None:
    from tanbr_ray.moe.resolve import MODEL_NAME

    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model {name!r}: not a built model's cache folder name (name-<12 hex digits>)")


def load_model(names: list[str], models_dir: str | os.PathLike | None = None, source: str | None = None,
               device: str | None = None):
    """The model for a process that must not build it: the first of `names` (cache folder names, in
    order of preference) in this machine's cache, else the first published at `source`, fetched and
    verified. Returns (model, where it came from: "cache" or "fetched")."""
    from tanbr_ray.moe.resolve import load_dir

    if isinstance(names, str) or not names:
        raise TypeError(f"model names: a non-empty list of cache folder names, got {names!r}")
    for n in names:
        _check_name(n)
    cache = Path(models_dir or default_models_dir())
    found = next((n for n in names if (cache / n / CONFIG).exists()), None)
    how = "cache"
    if found is None:
        if source is None:
            raise ValueError(f"model {names[0]}: not in this machine's cache ({cache}) and no model source to "
                             "fetch it from; run `tanbr build-moe [--model pool.yaml] --publish URI` and pass that URI "
                             "as model_source")
        errors = []
        for n in names:
            try:
                fetch(n, source, models_dir)
                found = n
                break
            except ValueError as exc:
                errors.append(str(exc))
                if "missing" not in str(exc):
                    raise  # present but corrupt: never fall back past a bad copy
        if found is None:
            raise ValueError(f"model {names[0]}: not in this machine's cache ({cache}) nor published at {source} "
                             f"({'; '.join(errors)})")
        how = "fetched"
    return load_dir(cache / found, device).moe, how
