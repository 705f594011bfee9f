import pytest

from mlxk import names
from mlxk.errors import AmbiguousMatch, InvalidName, ModelNotFound


@pytest.mark.parametrize("bad, problem", [
    ("../x", "is a folder path (a workspace), not a model name"),   # names.not_a_name: a WorkspacePath
    ("/etc/passwd", "is a folder path (a workspace), not a model name"),
    ("a//b", "double slash"),
    ("org/name/extra", "more than one '/'"),
    ("o/" + "n" * 95, "at most 96"),
    ("org/na\x00me", "control characters"),
    ("org/na\nme", "control characters"),
    ("org/-name", "not at the start or end"),
    ("org/name.", "not at the start or end"),
    ("org/na--me", "'--'"),
    ("org/na me", "only letters"),
    ("", "empty"),
])
def test_invalid_names_are_rejected_with_the_problem_named(bad, problem):
    with pytest.raises(InvalidName) as info:
        names.parse(bad)
    assert problem in info.value.message
    assert "repo id like" in info.value.message  # the fix: what a valid name looks like


@pytest.mark.parametrize("good", ["mlx-community/Qwen3-4B-4bit", "a/b", "Org_1/x.y-z", "o/" + "n" * 94])
def test_valid_repo_ids(good):
    assert names.parse(good).repo == good


def test_revision_split():
    ref = names.parse("org/name@abc123")
    assert (ref.repo, ref.revision) == ("org/name", "abc123")
    assert str(ref) == "org/name@abc123"
    with pytest.raises(InvalidName):
        names.parse("org/name@")
    with pytest.raises(InvalidName):
        names.parse("org/name@../../x")


def test_latest_tag_means_the_current_revision():
    """Ollama-style clients append `:latest`; it names what no tag names."""
    assert names.parse("org/name:latest") == names.parse("org/name") == names.ModelRef("org/name", None)
    assert names.parse("qwen:LATEST").repo == "qwen"
    assert names.parse("org/name@abc123:latest") == names.ModelRef("org/name", "abc123")
    assert names.tagged("org/name") == "org/name:latest"


@pytest.mark.parametrize("name, ref", [
    ("qwen3:0.6b-4bit", names.ModelRef("qwen3-0.6b-4bit")),          # a variant: joined with '-'
    ("org/name:4bit", names.ModelRef("org/name-4bit")),
    ("org/name:1a2b3c4d", names.ModelRef("org/name", "1a2b3c4d")),    # a commit prefix: that revision
])
def test_ollama_tags_map_onto_repos_and_revisions(name, ref):
    assert names.parse(name) == ref


@pytest.mark.parametrize("bad", [":latest", "org/name:latest:latest", ":7b", "org/name:", "org/name:a b",
                                 "org/name:7b@abc123", "org/name:-x", "a:b:c"])
def test_bad_tags_are_invalid_names(bad):
    with pytest.raises(InvalidName):
        names.parse(bad)


def test_bare_name_needs_org_only_when_asked():
    assert names.parse("qwen", allow_bare=True).repo == "qwen"
    with pytest.raises(InvalidName, match="needs an organisation"):
        names.parse("qwen", allow_bare=False)


CANDIDATES = ["mlx-community/Qwen3-4B-4bit", "mlx-community/Qwen3-8B-4bit", "mlx-community/Llama-3.2-1B"]


def test_resolve_exact_then_unique_substring_case_insensitive():
    assert names.resolve("mlx-community/llama-3.2-1b", CANDIDATES) == "mlx-community/Llama-3.2-1B"
    assert names.resolve("llama", CANDIDATES) == "mlx-community/Llama-3.2-1B"
    assert names.resolve("qwen3-4b-4BIT", CANDIDATES) == "mlx-community/Qwen3-4B-4bit"


def test_resolve_ambiguous_lists_every_match():
    with pytest.raises(AmbiguousMatch) as info:
        names.resolve("qwen3", CANDIDATES)
    assert info.value.details["matches"] == CANDIDATES[:2]
    assert "mlx-community/Qwen3-4B-4bit" in info.value.message and "mlx-community/Qwen3-8B-4bit" in info.value.message


def test_resolve_unknown_suggests_pull_and_close_names():
    with pytest.raises(ModelNotFound) as info:
        names.resolve("mlx-community/Llama-3.2-1C", CANDIDATES)
    assert "mlxk pull mlx-community/Llama-3.2-1C" in info.value.message
    assert "mlx-community/Llama-3.2-1B" in info.value.details["suggestions"]


def test_suggestions_come_closest_first():
    candidates = ["org/tiny-broken", "org/tiny-chat", "org/tiny-scripted"]
    with pytest.raises(ModelNotFound) as info:
        names.resolve("org/tiny-scriptd", candidates)
    assert info.value.details["suggestions"][0] == "org/tiny-scripted"


def test_resolve_revision_prefix():
    revs = ["abcdef0123" + "0" * 30, "abcd999999" + "0" * 30, "1234567890" + "0" * 30]
    assert names.resolve_revision("o/n", "1234", revs) == revs[2]
    with pytest.raises(AmbiguousMatch):
        names.resolve_revision("o/n", "abcd", revs)
    with pytest.raises(ModelNotFound, match="not cached"):
        names.resolve_revision("o/n", "ffff", revs)


def test_a_bare_name_in_several_orgs_means_mlx_community():
    """mlx-knife's rule (issue 12 #11): `NAME` held by several orgs is mlx-community/NAME, not ambiguous."""
    from mlxk import names

    cached = ["someone/Qwen3-4B-4bit", "mlx-community/Qwen3-4B-4bit", "other/Qwen3-4B-4bit-DWQ"]
    assert names.resolve("qwen3-4b-4bit", cached) == "mlx-community/Qwen3-4B-4bit"
    with pytest.raises(AmbiguousMatch):
        names.resolve("qwen3-4b", cached)
    assert names.expand_for_pull("Qwen3-4B-4bit@main") == ("mlx-community/Qwen3-4B-4bit@main",
                                                           "mlx-community/Qwen3-4B-4bit")
    assert names.expand_for_pull("org/x") == ("org/x", None)


def test_a_short_mistyped_name_gets_did_you_mean():
    """Issue 11: `mlxk show quen` gave no suggestion; the start of each model name is compared too."""
    with pytest.raises(ModelNotFound) as info:
        names.resolve("quen", ["mlx-community/Qwen3-0.6B-4bit", "mlx-community/Llama-3.2-1B-Instruct-4bit"])
    assert info.value.details["suggestions"] == ["mlx-community/Qwen3-0.6B-4bit"]
    assert "Did you mean: mlx-community/Qwen3-0.6B-4bit?" in info.value.message
    assert names.suggest("zzzz", ["mlx-community/Qwen3-0.6B-4bit"]) == []


@pytest.mark.parametrize("path", ["./my-model", "../x", "/abs/dir", "~/models/x", ".", ".."])
def test_a_workspace_path_is_not_a_model_name_and_says_which_commands_read_one(path):
    from mlxk.errors import WorkspacePath

    with pytest.raises(WorkspacePath) as info:
        names.parse(path)
    assert info.value.type == "workspace_path" and isinstance(info.value, InvalidName)
    assert f"`mlxk run {path}`, `mlxk show {path}` and `mlxk health {path}` read a workspace" in info.value.message
    assert "the api never reads a folder named in a request" in info.value.message
