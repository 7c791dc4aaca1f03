"""Text that already exists: local files or folders (.txt, .json, .jsonl, .parquet) and hub datasets,
loaded through ``datasets`` as one ``text`` column; cheap checks of both before anything heavy."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LBSearchError

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PROBE_JSON_BYTES = 64 << 20  # a .json file larger than this is checked when it is loaded


def looks_local(source: str) -> bool:
    """A path rather than a hub name: it exists, starts like a path, or ends in a known file type."""
    return (Path(source).expanduser().exists() or source.startswith((".", "/", "~"))
            or Path(source).suffix in LOCAL_BUILDERS)


def local_files(source: str, key: str = "data.source") -> list[Path]:
    """The text files of a local file or folder, sorted; one line when there are none or types mix."""
    path = Path(source).expanduser()
    if not path.exists():
        raise LBSearchError(f"{key}: {source!r}: no such file or folder")
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in LOCAL_BUILDERS)
    if not files:
        raise LBSearchError(f"{key}: {source}: no .txt, .json, .jsonl or .parquet files")
    builders = {LOCAL_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise LBSearchError(f"{key}: {source}: mixes file types {sorted(builders)}; use one type")
    return files


def file_fields(path: Path) -> list[str] | None:
    """The fields of a local file's records, read cheaply (first record, parquet schema); None when that
    cannot be told without loading it (a large or unusual .json). A .txt file has one field: ``text``."""
    if path.suffix == ".txt":
        return ["text"]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else None
        return []
    if path.stat().st_size > PROBE_JSON_BYTES:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return list(data[0])
    return list(data) if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) else None


def check_local(source: str, text_field: str, key: str) -> list[Path]:
    """A local source's files, each holding ``text_field`` (as far as a cheap look can tell)."""
    files = local_files(source, key)
    for path in files:
        try:
            names = file_fields(path)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise LBSearchError(f"{key}: {path}: unreadable ({type(exc).__name__})") from None
        if names is not None and text_field not in names:
            raise LBSearchError(f"{key}: {path}: no field {text_field!r} (fields: {', '.join(names) or 'none'}); "
                                "set text_field")
    return files


def file_corpus(source: str, text_field: str = "text", key: str = "data.source"):
    """A local file or folder (.txt: one document per paragraph), as a Dataset with a ``text`` column;
    a hub dataset name when no such path exists (as ``data.source`` always took both)."""
    from datasets import load_dataset

    if not Path(source).expanduser().exists() and not looks_local(source):
        return hub_corpus(source, text_field=text_field, key=key)
    files = local_files(source, key)
    builder = LOCAL_BUILDERS[files[0].suffix]
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    ds = load_dataset(builder, data_files=[str(p) for p in files], split="train", **extra)
    return _text_column(ds, text_field, source)


def hub_corpus(name: str, subset: str | None = None, split: str | None = None, text_field: str = "text",
               key: str = "data.source"):
    """A hub dataset (downloaded once by ``datasets``); offline or unknown: one line naming the key."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, subset, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline or unknown name: one line, not a traceback
        raise LBSearchError(f"{key}: {name!r}: not a local path and not loadable from the hub "
                            f"({type(exc).__name__}: {_first_line(exc)})") from None
    return _text_column(ds, text_field, name)


def check_hub(name: str, subset: str | None, text_field: str, key: str) -> None:
    """A hub dataset's metadata (not its data): it exists or is cached, and lists ``text_field`` when
    its features are known."""
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(name, subset)
    except Exception as exc:  # noqa: BLE001
        raise LBSearchError(f"{key}: {name!r}: not a local path and not loadable from the hub "
                            f"({type(exc).__name__}: {_first_line(exc)}); allowed: a registered source, "
                            "a local file or folder, or a hub dataset name") from None
    features = getattr(builder.info, "features", None)
    if features is not None and text_field not in features:
        raise LBSearchError(f"{key}: {name!r}: no column {text_field!r} (columns: {', '.join(features)}); "
                            "set text_field")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def _text_column(ds, text_field: str, source: str):
    if text_field not in ds.column_names:
        raise LBSearchError(f"{source}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                            "set text_field")
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.select_columns(["text"]).filter(lambda r: bool(r["text"] and r["text"].strip()))
