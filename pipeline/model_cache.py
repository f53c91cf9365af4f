"""Registered models downloaded once per version and reused.

Commands that take a `models:/` URI (predict, evaluate, export --onnx, finetune --from) read the
version's export from a local folder. Downloading it into a fresh temporary folder on every call
left one copy of the weights behind per call. Here a version lands once under
`<cache_root>/<name>/v<version>-<run id>` and later calls reuse it: a registered version's files
never change (a new registration is a new version), and the run id keeps a store rebuilt at the
same path (a deleted and re-run workdir, its version 1 again) from reading another model's files.
An alias is resolved to its version on every call, so a moved alias fetches the new version.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pipeline.registry import EXPORT_FILES, RegistryError, resolve_model_uri, resolve_version

CACHE_FOLDER = Path(".cache") / "models"
_DONE = "export_path.txt"  # written last: the export folder inside, relative to the version folder


def workdir_model_cache(workdir: str | Path) -> Path:
    """The workdir's cache of downloaded registered models (deleted with the workdir)."""
    return Path(workdir).resolve() / CACHE_FOLDER


def cached_model(uri: str, tracking_uri: str, cache_root: str | Path) -> Path:
    """The local export folder of `models:/<name>@<alias>` or `models:/<name>/<version>`,
    downloaded into cache_root the first time that version is asked for."""
    name, version, run_id = resolve_version(uri, tracking_uri)
    folder = Path(cache_root) / safe_folder_name(name) / f"v{version}-{run_id[:12] or 'norun'}"
    cached = _complete(folder)
    if cached is not None:
        return cached
    shutil.rmtree(folder, ignore_errors=True)  # a download that lost files is fetched again
    # Download beside the final folder and rename: a concurrent call never reads half a model.
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    export = resolve_model_uri(f"models:/{name}/{version}", tracking_uri, partial)
    (partial / _DONE).write_text(str(export.relative_to(partial)))
    try:
        partial.rename(folder)
    except OSError:  # another call finished the same version first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    cached = _complete(folder)
    if cached is None:
        raise RegistryError(f"pipeline/model_cache.py: {folder} is incomplete; delete it and retry")
    return cached


def _complete(folder: Path) -> Path | None:
    """The export folder of a finished download, None when there is none (or it lost files)."""
    marker = folder / _DONE
    if not marker.is_file():
        return None
    export = folder / marker.read_text().strip()
    return export if all((export / f).is_file() for f in EXPORT_FILES) else None


def safe_folder_name(text: str) -> str:
    """`text` as one folder name: anything but letters, digits, `.`, `_` and `-` becomes `_`."""
    return re.sub(r"[^\w.\-]", "_", text)
