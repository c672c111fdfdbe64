"""Sharing runs on a model hub: push (one verified, idempotent commit) and pull (a hub id works like a run dir).

Push: ``create_repo(exist_ok=True)``, then ONE ``create_commit`` holding the adapter (or ``merged/``), the
tokenizer and chat template, the model card (README.md), a path-free manifest summary and the eval/merge reports.
huggingface_hub's preupload step returns the remote hash of every file and drops unchanged ones, so running the same
push again commits nothing. Transient errors (5xx, 429, timeouts, dropped connections) are retried with exponential
backoff; a commit whose response was lost is therefore retried as a no-op. ``published.json`` is written only after
the remote file list at the new commit has been read back and matches every local hash.

The token is never handled here: huggingface_hub reads it from ``HF_TOKEN`` or its login. Every file this module
writes or uploads is scanned for the token first, and every message it prints is redacted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters.compat.huggingface_hub import client_timeout
from adapters.publish.rundir import Run, RunError, open_run
from adapters.utils.atomic import write_json, write_text
from adapters.utils.errors import AdaptersError

PUBLISHED = "published.json"
STAGE = "hub"  # RUN_DIR/hub/: the generated files that are uploaded (card, adapter_config, manifest summary)
MANIFEST_NAME = "training_manifest.json"
REPORTS = ("eval.json", "merge_report.json")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class HubError(AdaptersError, RuntimeError):
    """A push or pull failed; the message names the run, file or repo (never the token)."""


@dataclass
class Upload:
    path_in_repo: str
    local: Path
    size: int
    sha256: str
    git_oid: str  # git blob sha1: what the hub reports as a regular file's oid

    def row(self) -> dict[str, Any]:
        return {"path": self.path_in_repo, "size": self.size, "sha256": self.sha256, "local": str(self.local)}


# ---------------------------------------------------------------------------------------------------- token safety
def _token_values() -> list[str]:
    vals = {os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    try:
        from huggingface_hub import get_token

        vals.add(get_token())
    except Exception:  # no login: nothing to hide
        pass
    return sorted(v for v in vals if v and len(v) >= 8)


def redact(text: str) -> str:
    for t in _token_values():
        text = text.replace(t, "***")
    return text


def file_contains(path: Path, needles: list[bytes], chunk: int = 1 << 20) -> bool:
    """Whether any needle occurs in the file (chunked, with overlap, so large weights are fine)."""
    if not needles:
        return False
    keep = max(len(n) for n in needles) - 1
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            buf = tail + block
            if any(n in buf for n in needles):
                return True
            tail = buf[-keep:] if keep else b""
    return False


def assert_token_free(paths: list[Path]) -> None:
    needles = [t.encode() for t in _token_values()]
    for p in paths:
        if file_contains(p, needles):
            raise HubError(f"{p}: contains the hub token; refusing to upload or keep it (remove the token from it)")


# ---------------------------------------------------------------------------------------------------- staging
def _hashes(path: Path, chunk: int = 1 << 20) -> tuple[int, str, str]:
    size = path.stat().st_size
    sha, git = hashlib.sha256(), hashlib.sha1()
    git.update(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            git.update(block)
    return size, sha.hexdigest(), git.hexdigest()


def public_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """The manifest without local paths or per-step logs: what a pulled adapter is checked against."""
    keep = (
        "run_name",
        "base_fingerprint",
        "base_config",
        "chat_template_sha256",
        "seed",
        "world_size",
        "effective_batch_size",
        "quantization",
        "parameters",
        "train",
        "adapter",
        "versions",
        "status",
    )
    out = {k: m[k] for k in keep if k in m}
    base = m.get("base_model", {})
    out["base_model"] = {k: base.get(k) for k in ("canonical_name", "kind", "sha256", "license")}
    cfg = dict(m.get("config", {}))
    cfg["model_name_or_path"] = base.get("canonical_name", cfg.get("model_name_or_path"))
    for k in ("train_file", "eval_file", "test_file"):
        if cfg.get(k):
            cfg[k] = Path(cfg[k]).name
    cfg.pop("output_root", None)
    out["config"] = cfg
    out["recipe_file"] = Path(str(m.get("recipe_file", ""))).name
    data = m.get("data") or {}
    out["data"] = {  # split summaries only: other data-report entries may hold local paths
        s: {
            **{k: v for k, v in data[s].items() if k != "dropped_rows"},
            "file": Path(data[s]["file"]).name if isinstance(data[s].get("file"), str) else None,
        }
        for s in ("train", "eval", "test")
        if isinstance(data.get(s), dict)
    }
    out["git"] = {"commit": (m.get("git") or {}).get("commit"), "dirty": (m.get("git") or {}).get("dirty")}
    hw = m.get("hardware") or {}
    out["hardware"] = {k: hw[k] for k in ("machine", "cpu_count", "cuda", "gpus") if k in hw}
    return out


def stage(
    run_dir: str | Path, repo_id: str, merged: bool = False, datasets: list[str] | None = None
) -> tuple[Run, list[Upload]]:
    """Write RUN_DIR/hub/ (card, adapter_config.json with the canonical base, manifest summary) and return the
    exact list of files one push uploads, sorted by path in repo."""
    from adapters.publish.card import build_card
    from adapters.training.checkpoints import validate_adapter_dir

    try:
        run = open_run(run_dir)
    except RunError as e:
        raise HubError(str(e)) from None
    src = run.path / "merged" if merged else run.adapter_dir
    if merged and not (src / "config.json").is_file():
        raise HubError(f"{src}: no merged model (config.json missing); run `adapters merge {run.path}` first")
    if not merged:
        validate_adapter_dir(src)  # nothing empty, NaN, partial or unreadable is ever pushed
    out = run.path / STAGE
    out.mkdir(exist_ok=True)
    canonical = run.manifest["base_model"]["canonical_name"]
    files: dict[str, Path] = {}
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in Path(rel).parts) and rel != "README.md":
            files[rel] = p
    if not merged:
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = canonical  # never the local cache path
        write_json(out / "adapter_config.json", cfg)
        files["adapter_config.json"] = out / "adapter_config.json"
    write_json(out / MANIFEST_NAME, public_manifest(run.manifest))
    files[MANIFEST_NAME] = out / MANIFEST_NAME
    for name in REPORTS:
        if (run.path / name).is_file():
            files[name] = run.path / name
    card = build_card(run.manifest, run.path, repo_id, merged=merged, datasets=datasets)
    write_text(out / "README.md", str(card))
    files["README.md"] = out / "README.md"
    assert_token_free(list(files.values()))
    uploads = [Upload(k, v, *_hashes(v)) for k, v in sorted(files.items())]
    return run, uploads


# ---------------------------------------------------------------------------------------------------- retries
def is_transient(e: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        r = getattr(e, "response", None)
        return r is not None and r.status_code in TRANSIENT_STATUS
    return isinstance(e, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))


def with_retries(
    fn: Callable[[], Any],
    what: str,
    attempts: int = 5,
    backoff: float = 1.0,
    max_wait: float = 30.0,
    log: Callable[[str], None] = print,
) -> Any:
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            msg = redact(f"{type(e).__name__}: {e}".splitlines()[0])
            if not is_transient(e):
                raise HubError(f"{what}: {msg}") from None
            if i == attempts - 1:
                raise HubError(f"{what}: still failing after {attempts} attempts: {msg}") from None
            wait = min(max_wait, backoff * 2**i)
            log(f"[push] {what}: {msg}; retrying in {wait:.1f}s ({i + 2}/{attempts})")
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------- push
def verify_remote(remote: list, uploads: list[Upload]) -> dict[str, Any]:
    """Every uploaded file is in the remote listing with the same size and hash; returns path -> remote oid."""
    by_path = {f.path: f for f in remote if hasattr(f, "blob_id")}
    bad = []
    for u in uploads:
        f = by_path.get(u.path_in_repo)
        if f is None:
            bad.append(f"{u.path_in_repo}: missing")
            continue
        lfs_sha = getattr(f.lfs, "sha256", None) if f.lfs else None
        if f.size != u.size or (lfs_sha or f.blob_id) != (u.sha256 if lfs_sha else u.git_oid):
            bad.append(f"{u.path_in_repo}: remote size/hash differ")
    if bad:
        raise HubError("the remote files do not match the upload: " + "; ".join(bad))
    return {u.path_in_repo: by_path[u.path_in_repo].blob_id for u in uploads}


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    merged: bool = False,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    datasets: list[str] | None = None,
    attempts: int = 5,
    backoff: float = 1.0,
    timeout: float | None = 60.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Push a finished run; returns the published record (or, with ``dry_run``, the plan)."""
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise HubError(f"--repo-id {repo_id!r}: expected ORG/NAME")
    run, uploads = stage(run_dir, repo_id, merged=merged, datasets=datasets)
    total = sum(u.size for u in uploads)
    log(
        f"[push] {len(uploads)} files, {total:,} bytes -> {repo_id}@{revision or 'main'}"
        + (" (dry run: nothing is sent)" if dry_run else "")
    )
    for u in uploads:
        log(f"[push]   {u.path_in_repo:32s} {u.size:>12,d}  sha256 {u.sha256}")
    plan = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "merged": merged,
        "total_bytes": total,
        "files": [u.row() for u in uploads],
    }
    if dry_run:
        write_json(run.path / STAGE / "dry_run.json", plan)
        log(f"[push] card written to {run.path / STAGE / 'README.md'}")
        return plan

    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: unset it to push (or use --dry-run)")
    api = HfApi(endpoint=endpoint)  # no token argument: huggingface_hub reads HF_TOKEN or its login
    if not _token_values():
        raise HubError(
            "no hub token: set HF_TOKEN in the environment or run `hf auth login` (never pass it as an argument)"
        )
    message = f"{'Merged model' if merged else 'Adapter'} from run {run.manifest.get('run_name', run.path.name)}"
    with client_timeout(timeout):
        info, remote = _send(api, repo_id, revision or "main", private, uploads, message, attempts, backoff, log)
    oids = verify_remote(remote, uploads)
    record = {
        **plan,
        "endpoint": api.endpoint,
        "commit": info.oid,
        "commit_url": str(info.commit_url),
        "verified": True,
        "remote_oids": oids,
        "pushed": datetime.now().isoformat(timespec="seconds"),
    }
    write_json(run.path / PUBLISHED, record)
    assert_token_free([run.path / PUBLISHED])
    log(f"[push] verified {len(uploads)} files at {repo_id}@{info.oid[:12]}; record -> {run.path / PUBLISHED}")
    return record


def _send(api, repo_id: str, branch: str, private: bool, uploads: list[Upload], message: str, attempts, backoff, log):
    """Create the repo (and branch), commit every upload in one commit, list the files of that commit; each call
    retried on transient errors. Returns (commit info, remote files)."""
    from huggingface_hub import CommitOperationAdd

    kw = dict(attempts=attempts, backoff=backoff, log=log)
    with_retries(
        lambda: api.create_repo(repo_id, private=private or None, exist_ok=True), f"create_repo {repo_id}", **kw
    )
    if branch != "main":
        with_retries(
            lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), f"create_branch {repo_id}@{branch}", **kw
        )

    def commit():  # fresh operations each attempt: huggingface_hub mutates them
        ops = [CommitOperationAdd(path_in_repo=u.path_in_repo, path_or_fileobj=str(u.local)) for u in uploads]
        return api.create_commit(
            repo_id,
            operations=ops,
            revision=branch,
            commit_message=message,
            commit_description="Pushed by `adapters push`.",
        )

    info = with_retries(commit, f"commit to {repo_id}@{branch}", **kw)
    remote = with_retries(
        lambda: list(api.list_repo_tree(repo_id, revision=info.oid, recursive=True)),
        f"list files of {repo_id}@{info.oid[:12]}",
        **kw,
    )
    return info, remote


# ---------------------------------------------------------------------------------------------------- pull
class HubRun(Run):
    """A pulled adapter: the snapshot folder holds the adapter files at its root."""

    @property
    def adapter_dir(self) -> Path:
        return self.path


def _base_source(canonical: str) -> str:
    from adapters.model.sources import EMBEDDED

    for name, info in EMBEDDED.items():
        if info["canonical_name"] == canonical:
            return f"embedded:{name}"
    return canonical


def run_from_adapter_dir(path: Path, base: str | None = None) -> HubRun:
    """A Run for a folder holding an adapter (a hub snapshot): the base comes from adapter_config.json (or
    ``base``), the identity checks from training_manifest.json."""
    from adapters.config import recipe_from_config
    from adapters.model.sources import resolve_model

    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{cfg_path}: cannot read: {e}") from None
    name = cfg.get("base_model_name_or_path")
    if not name and not base:
        raise HubError(f"{cfg_path}: base_model_name_or_path: missing, so the base model is unknown (pass base=)")
    from adapters.publish.rundir import check_adapter_file

    check_adapter_file(path)
    mf = path / MANIFEST_NAME
    manifest = json.loads(mf.read_text()) if mf.is_file() else {}
    source = base or _base_source(name)
    ref = resolve_model(source)
    recipe = recipe_from_config(manifest.get("config") or {}, str(mf), model_name_or_path=source)
    return HubRun(path, manifest, recipe, ref)


def pulled_dir(repo_id: str, output_root: str | Path = "outputs") -> Path:
    """Where a pulled adapter is copied: verbs write their reports (eval.json, merged/, gguf/) next to it, never
    into the hub cache, whose files are shared read-only blobs."""
    return Path(output_root) / f"hub--{repo_id.replace('/', '--')}"


def _materialize(snapshot: Path, repo_id: str, revision: str | None, output_root: str | Path) -> Path:
    import shutil

    dest = pulled_dir(repo_id, output_root)
    dest.mkdir(parents=True, exist_ok=True)
    for p in snapshot.iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copyfile(p, dest / p.name)  # follows the cache's symlinks to the blobs
    write_json(dest / "pulled.json", {"repo_id": repo_id, "revision": revision or "main", "snapshot": str(snapshot)})
    return dest


def resolve_adapter(
    id_or_path: str | Path,
    revision: str | None = None,
    endpoint: str | None = None,
    base: str | None = None,
    output_root: str | Path = "outputs",
) -> Run:
    """A run directory, an adapter folder or a hub id (``org/name``) -> a Run that ``rundir.load_tuned`` accepts.

    A hub id is downloaded with ``snapshot_download`` (cached) and copied to ``outputs/hub--org--name/``;
    ``load_tuned`` then refuses a base whose fingerprint differs from the one in training_manifest.json.
    """
    p = Path(id_or_path)
    if p.exists():
        if (p / "manifest.json").is_file():
            return open_run(p)
        if (p / "adapter_config.json").is_file():
            return run_from_adapter_dir(p, base)
        raise HubError(
            f"{p / 'manifest.json'}: missing; {p} is not a run directory (outputs/<run_name>/) and has no "
            "adapter_config.json: neither a run directory (manifest.json) nor an adapter (adapter_config.json)"
        )
    rid = str(id_or_path)
    if rid.count("/") != 1 or rid.startswith((".", "/")) or Path(rid).parent.is_dir():  # outputs/typo: a path
        raise HubError(
            f"{p / 'manifest.json'}: missing; {p} is not a run directory (no such directory), and not a hub id "
            "(ORG/NAME)"
        )
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(rid, revision=revision, endpoint=endpoint)
    except Exception as e:
        raise HubError(redact(f"{rid}: cannot download: {type(e).__name__}: {e}".splitlines()[0])) from None
    return run_from_adapter_dir(_materialize(Path(local), rid, revision, output_root), base)
