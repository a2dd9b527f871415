"""Where `VideoTokenizer.from_pretrained` finds an export: a local folder, or a Hugging Face Hub
repo id fetched with `huggingface_hub.snapshot_download` into its cache.

The Hub is optional: `huggingface_hub` is imported only for a repo id, and only the export's two
files are fetched. Offline, the cached snapshot is used; without the package or the cache, the
error says what to do. Nothing else in `model/` touches the network.
"""

from __future__ import annotations

import re
from pathlib import Path

from model.export_format import CONFIG_NAME, WEIGHTS_NAME

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""`owner/name`, as the Hub spells repo ids."""


def resolve_pretrained(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local folder holding the export `path_or_repo_id` names: the folder itself if it
    exists, else the Hub snapshot of that repo id (downloaded, or from the cache)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if isinstance(path_or_repo_id, Path) or not REPO_ID.match(name):
        raise FileNotFoundError(
            f"{name}: no such export folder (a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, as "
            "save_pretrained writes it), and not a Hugging Face Hub repo id (owner/name)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(
            f"{name!r} is not a local folder, and loading it as a Hugging Face Hub repo id "
            "needs huggingface_hub: `pip install huggingface_hub`, or download the export "
            "and pass its local folder"
        ) from error
    fetch = {
        "repo_id": name,
        "revision": revision,
        "cache_dir": cache_dir,
        "token": token,
        "allow_patterns": [CONFIG_NAME, WEIGHTS_NAME],
    }
    try:
        return Path(snapshot_download(**fetch, local_files_only=local_files_only))
    except Exception as error:  # offline (httpx / requests errors), unknown or gated repo
        first = error
    if not local_files_only:
        try:
            return Path(snapshot_download(**fetch, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached either: report the first failure
            pass
    raise OSError(
        f"could not fetch {name!r} from the Hugging Face Hub ({type(first).__name__}: {first}) "
        "and it is not in the local cache. Check the repo id and your connection (a private "
        "repo needs `huggingface-cli login` or token=...), download it on a connected machine "
        f"(`huggingface-cli download {name}`), or pass the path of a local export folder"
    ) from first
