"""What the vault's writing and maintenance methods return: typed records, not dicts.

Each is a dataclass, so a caller reads `result.written` rather than guessing keys, and the CLI
turns any of them into JSON with `dataclasses.asdict`. (Lookup and restore results live with the
read path.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoreResult:
    """What warm() or save() stored."""
    namespace: str
    tokens: int
    chunks: int  # chunks covering the prompt
    written: int = 0  # chunks written by this call (the rest were already stored)
    bytes_written: int = 0
    fp16_bytes: int = 0  # what the written chunks' keys and values weigh in float16
    tokens_reused: int = 0  # tokens restored instead of prefilled (when the prompt was prefilled)
    prefill_s: float = 0.0
    encode_s: float = 0.0
    write_s: float = 0.0
    evicted: int = 0  # chunks evicted afterwards to respect the disk cap
    prefilled: bool = False  # the blocks were computed by prefilling the prompt, not taken from a cache


@dataclass
class NamespaceStats:
    """One namespace (model × codec × KV dtype × layout × block size) of a vault."""
    namespace: str
    model: str | None  # the model fingerprint
    codec: str | None  # its name (promptvault.codec.spec grammar)
    kv_dtype: str | None
    chunks: int
    tokens: int
    bytes: int  # shard bytes
    hits: int
    fp16_bytes: int  # what its tokens' keys and values weigh in float16
    ratio_vs_fp16: float | None


@dataclass
class VaultStats:
    path: str
    block_size: int
    chunks: int
    bytes_on_disk: int  # everything under the vault directory (what the disk cap counts)
    shard_bytes: int
    fp16_bytes: int
    ratio_vs_fp16: float | None
    disk_cap: int | None
    ram_cap: int
    ram_bytes: int
    ram_chunks: int
    warmed: int
    quarantined: int  # files kept in quarantine/
    namespaces: list[NamespaceStats] = field(default_factory=list)


@dataclass
class VerifyResult:
    checked: int
    ok: int
    bad: list[str]  # keys of the files that failed their check (now in quarantine/)
    adopted: list[str]  # keys of files the index did not list, now indexed
    missing: list[str]  # keys whose files were gone (their rows dropped)


@dataclass
class GcResult:
    temp_files_removed: int
    rows_dropped: int
    files_adopted: int
    evicted: int
    quarantine_removed: int
    bytes_on_disk: int  # after tidying


@dataclass
class RmResult:
    removed_chunks: int
    removed_warmed: int


@dataclass
class ReindexResult:
    files: int
    indexed: int
    quarantined: int
    namespaces: int
    warmed: int


@dataclass
class Settings:
    """The settings a vault keeps in vault.json (configure() changes the caps)."""
    block_size: int
    disk_cap: int | None
    ram_cap: int


@dataclass
class Warmed:
    """A prompt stored by warm(): its label and where its chain ends."""
    label: str | None
    source: str | None
    tokens: int
    namespace: str
    created: float
    last_key: str

    @classmethod
    def from_row(cls, row: dict) -> "Warmed":
        return cls(label=row["label"], source=row["source"], tokens=row["n_tokens"], namespace=row["namespace"],
                   created=row["created"], last_key=row["last_key"])


@dataclass
class ChunkInfo:
    """One stored chunk (a block, or a prompt's shorter tail)."""
    key: str
    parent: str | None
    namespace: str
    position: int  # its first token
    n_tokens: int
    bytes: int
    file: str  # under shards/
    created: float | None = None
    last_used: float | None = None
    hits: int | None = None

    @classmethod
    def from_row(cls, row: dict) -> "ChunkInfo":
        """From an index row (index.py); its token bytes and checksum stay in the index."""
        return cls(key=row["key"], parent=row["parent"], namespace=row["namespace"], position=row["position"],
                   n_tokens=row["n_tokens"], bytes=row["bytes"], file=row["file"], created=row.get("created"),
                   last_used=row.get("last_used"), hits=row.get("hits"))


@dataclass
class Description:
    """What describe() found: the warmed prompts with a label, or one chunk; each with its chain
    of chunks from the prompt's first token."""
    ref: str
    warmed: list[Warmed] = field(default_factory=list)
    chunk: ChunkInfo | None = None
    chains: list[list[ChunkInfo]] = field(default_factory=list)  # one per warmed prompt, or the chunk's
