"""Model names: validate, parse `name@rev`, and resolve a user's short name against what is cached.

Repo ids are validated before any disk or network work, so a name can never escape the cache directory.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from mlxk.errors import AmbiguousMatch, InvalidName, ModelNotFound, WorkspacePath

MAX_REPO_ID_LENGTH = 96
_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_HEX = re.compile(r"^[0-9a-f]{4,40}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


@dataclass(frozen=True)
class ModelRef:
    """What the user typed, split: `org/name@rev` → repo `org/name`, revision `rev` (or None)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


def _fail(name: str, problem: str) -> InvalidName:
    return InvalidName(
        f"invalid model name {name!r}: {problem}. Use a Hugging Face repo id like 'mlx-community/Qwen3-4B-4bit'.",
        name=name,
    )


def validate_repo_id(repo_id: str, *, allow_bare: bool = False) -> str:
    """Return `repo_id` if it is a valid Hub repo id (`org/name`; `name` alone when allow_bare)."""
    if not repo_id:
        raise _fail(repo_id, "it is empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in repo_id):
        raise _fail(repo_id, "it contains control characters")
    if len(repo_id) > MAX_REPO_ID_LENGTH:
        raise _fail(repo_id, f"it is {len(repo_id)} characters long; the Hub allows at most {MAX_REPO_ID_LENGTH}")
    if repo_id.startswith("/") or repo_id.endswith("/") or "//" in repo_id:
        raise _fail(repo_id, "it has a leading, trailing or double slash")
    parts = repo_id.split("/")
    if len(parts) > 2:
        raise _fail(repo_id, "it has more than one '/'; the form is 'org/name'")
    if len(parts) == 1 and not allow_bare:
        raise _fail(repo_id, "it needs an organisation, as in 'org/name'")
    for part in parts:
        if ".." in part or "--" in part:
            raise _fail(repo_id, "'..' and '--' are not allowed")
        if not _PART.match(part):
            raise _fail(repo_id, "only letters, digits, '-', '_' and '.' are allowed, "
                                 "not at the start or end of a part")
    return repo_id


LATEST_TAG = ":latest"  # ollama's default tag, which clients append: the current revision, as if no tag were given
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")  # ollama's tag grammar (types/model/name.go)


def parse(name: str, *, allow_bare: bool = True) -> ModelRef:
    """Split `org/name@rev`; validates both halves. Ollama-style tags map onto repos and revisions:

    `:latest` (ollama's default tag, which clients append) names the current revision, as if no tag were given;
    a tag that is a commit prefix (4-40 hex digits) names that revision, so `org/name:1a2b3c4d` is
    `org/name@1a2b3c4d`; any other tag names a variant repo, joined with '-': `qwen3:0.6b-4bit` is `qwen3-0.6b-4bit`
    (which the resolver then matches as usual, e.g. to mlx-community/Qwen3-0.6B-4bit).
    """
    if name is None or not name.strip():
        raise _fail(name or "", "it is empty")
    text = name.strip()
    if is_workspace_path(text):
        raise not_a_name(name)
    if text.lower().endswith(LATEST_TAG) and len(text) > len(LATEST_TAG):
        text = text[: -len(LATEST_TAG)]
    repo, sep, revision = text.partition("@")
    repo, colon, tag = repo.partition(":")
    if colon:
        if not repo or not _TAG.match(tag) or tag.lower() == LATEST_TAG[1:]:
            raise _fail(name, "the tag after ':' may hold letters, digits, '_', '.' and '-' (at most 80)")
        if sep:
            raise _fail(name, "give a ':tag' or an '@revision', not both")
        if is_commit_prefix(tag):
            sep, revision = "@", tag
        else:
            repo = f"{repo}-{tag}"
    validate_repo_id(repo, allow_bare=allow_bare)
    if sep:
        if not revision or not _REVISION.match(revision) or ".." in revision:
            raise _fail(name, "the revision after '@' must be a commit hash, branch or tag")
        return ModelRef(repo, revision)
    return ModelRef(repo, None)


def tagged(repo_id: str) -> str:
    """The ollama-style name of a repo's current revision (`org/name:latest`): clients that add `:latest` to a
    name without a tag (Open WebUI) then find it as listed."""
    return f"{repo_id}{LATEST_TAG}"


WORKSPACE_PREFIXES = ("./", "../", "/", "~")


def is_workspace_path(name: str) -> bool:
    """A model folder on disk (`./my-model`, `/abs/dir`, `~/dir`), not a cached repo name: what mlx-knife's API
    calls a workspace path. Repo ids never start like this (validate_repo_id refuses a leading '/' or '.')."""
    return name in (".", "..") or name.startswith(WORKSPACE_PREFIXES)


def not_a_name(path: str) -> WorkspacePath:
    """The error for a workspace path where a model name is needed (mlx-knife 2.0.8 accepts one in `show`,
    `health` and `run`, refuses it in `rm`, and fails a `pull` of one with a Hub error). The api server says the
    same of a path in a request's `model`: it serves a folder only by the id `mlxk run PATH` registers."""
    return WorkspacePath(
        f"{path!r} is a folder path (a workspace), not a model name: pull, rm, clone and serve work on the HF cache, "
        f"and the api never reads a folder named in a request. `mlxk run {path}`, `mlxk show {path}` and `mlxk "
        f"health {path}` read a workspace (`mlxk run {path} --json` registers it and gives its id, "
        "'workspace:<16 hex>', which the api takes as a model); elsewhere give a Hub repo id like "
        "'mlx-community/Qwen3-4B-4bit' or the name of a cached model.", name=path)


DEFAULT_ORG = "mlx-community"  # where a bare name points, as mlx-knife expands it


def expand_for_pull(name: str) -> tuple[str, str | None]:
    """(name to pull, the expanded repo id or None): a bare `NAME[@REV]` means `mlx-community/NAME[@REV]`."""
    ref = parse(name, allow_bare=True)
    if "/" in ref.repo:
        return name, None
    expanded = f"{DEFAULT_ORG}/{ref.repo}"
    validate_repo_id(expanded)
    return str(ModelRef(expanded, ref.revision)), expanded


def is_commit_prefix(revision: str) -> bool:
    return bool(_HEX.match(revision))


def alias_key(name: str) -> str:
    """How an alias is stored and looked up: parsed like any name (tags mapped, `:latest` dropped), lowercased."""
    return str(parse(name)).lower()


def resolve(name: str, candidates: list[str], aliases: dict[str, str] | None = None) -> str:
    """The one cached repo id `name` means: an alias (exact, case-insensitive; `aliases` maps alias_key → repo id)
    of a cached repo, else exact (case-insensitive), else a unique case-insensitive substring."""
    lowered = name.lower()
    target = (aliases or {}).get(lowered)
    if target is not None and target in candidates:
        return target
    exact = [c for c in candidates if c.lower() == lowered]
    if len(exact) == 1:
        return exact[0]
    by_name = [c for c in candidates if c.lower().split("/")[-1] == lowered]
    if len(by_name) == 1:
        return by_name[0]
    preferred = [c for c in by_name if c.lower().startswith(DEFAULT_ORG + "/")]
    if len(preferred) == 1:  # `NAME` in several orgs: mlx-knife's rule, mlx-community/NAME
        return preferred[0]
    matches = sorted(c for c in candidates if lowered in c.lower())
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = matches[:20]
        more = f" (and {len(matches) - len(shown)} more)" if len(matches) > len(shown) else ""
        raise AmbiguousMatch(
            f"{name!r} matches {len(matches)} models: {', '.join(shown)}{more}. Use the full name.",
            matches=matches,
        )
    raise not_found(name, candidates)


def resolve_revision(repo_id: str, revision: str, revisions: list[str]) -> str:
    """The one cached snapshot hash `revision` (a commit prefix) names."""
    hits = [r for r in revisions if r.startswith(revision.lower())]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise AmbiguousMatch(
            f"'{repo_id}@{revision}' matches {len(hits)} cached revisions: {', '.join(h[:12] for h in hits)}. "
            "Give more characters of the hash.",
            matches=hits,
        )
    cached = ", ".join(r[:12] for r in revisions) or "none"
    # available_hashes: mlx-knife's error field for the revisions there are (its schema's `error.available_hashes`)
    raise ModelNotFound(f"revision {revision!r} of {repo_id} is not cached (cached: {cached}).", name=repo_id,
                        available_hashes=list(revisions))


def pick_revision(repo_id: str, revision: str, revisions: list[str], refs: dict[str, str]) -> str:
    """The one cached snapshot `repo@revision` names, for every command alike: a commit prefix of a cached
    snapshot first, else a branch or tag (refs/<name>) that points at one, else the commit-prefix rules' error."""
    lowered = revision.lower()
    if is_commit_prefix(lowered) and any(r.startswith(lowered) for r in revisions):
        return resolve_revision(repo_id, revision, revisions)
    named = refs.get(revision)
    if named and named in revisions:
        return named
    return resolve_revision(repo_id, revision, revisions)


def not_found(name: str, candidates: list[str]) -> ModelNotFound:
    suggestions = suggest(name, candidates)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    pull = f" To download it: mlxk pull {name if '/' in name else 'ORG/' + name}"
    return ModelNotFound(f"no cached model matches {name!r}.{hint}{pull}", name=name, suggestions=suggestions)


SUGGESTION_CUTOFF = 0.6


def suggest(name: str, candidates: list[str], limit: int = 3) -> list[str]:
    """The cached ids closest to a mistyped name, best first: a short name (`quen`) is compared with the start of
    each model name (`qwen3-...`), a full one with the whole id, so both typo kinds find their model."""
    lowered = name.lower()
    scored = []
    for candidate in candidates:
        whole = candidate.lower()
        part = whole.split("/")[-1]
        texts = (whole, part, part[: len(lowered)], whole[: len(lowered)]) if "/" not in lowered else (whole,)
        score = max(difflib.SequenceMatcher(None, lowered, text).ratio() for text in texts)
        if score >= SUGGESTION_CUTOFF:
            scored.append((-score, candidate))
    return [candidate for _score, candidate in sorted(scored)[:limit]]
