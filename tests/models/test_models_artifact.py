"""Model artifacts: save/load round trip, hashing, atomic writes and bad-file errors."""

import os
from pathlib import Path

import pytest
import torch

from pollinate.models import (
    FORMAT,
    ArtifactError,
    ModelArtifact,
    ModelSpec,
    atomic_link,
    available_models,
    create_model,
    load_artifact,
    save_artifact,
    weights_hash,
)
from pollinate.models import artifact as artifact_module

F, K = 16, 3


@pytest.fixture(params=available_models())
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    save_artifact(path, create_model("mlp", in_features=F, num_classes=K, seed=0), round=3)
    return path


def rewrite(path: Path, edit) -> None:
    """Load the raw payload, let ``edit`` change it in place, save it back."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(ArtifactError, match=match) as e:
        load_artifact(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(e.value, ValueError)


def test_save_load_build_predicts_identically(name: str, tmp_path: Path) -> None:
    model = create_model(name, in_features=F, num_classes=K, seed=0)
    model.eval()
    path = tmp_path / "runs" / "global" / "model.pt"  # parents are created
    saved = save_artifact(path, model, round=5, metrics={"accuracy": 0.5, "loss": 1})
    loaded = load_artifact(path)

    assert loaded.spec == model.spec
    assert loaded.round == 5 and loaded.metrics == {"accuracy": 0.5, "loss": 1.0}
    assert loaded.kind == "global" and loaded.user is None
    assert loaded.created_at == saved.created_at > 0
    assert loaded.content_hash == saved.content_hash == weights_hash(model.state_dict())
    assert loaded.version == {"round": 5, "hash": saved.content_hash}

    rebuilt = loaded.build()
    assert not rebuilt.training
    x = torch.randn(8, F)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_save_from_spec_and_state_dict(tmp_path: Path) -> None:
    model = create_model("cnn", in_features=F, num_classes=K, seed=0)
    path = tmp_path / "alice.pt"
    save_artifact(
        path, spec=model.spec, state_dict=model.state_dict(), round=0, kind="personal", user="a"
    )
    loaded = load_artifact(path)
    assert (loaded.kind, loaded.user, loaded.metrics) == ("personal", "a", {})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict.items())


def test_file_is_a_plain_weights_only_dict(saved: Path) -> None:
    payload = torch.load(saved, weights_only=True)
    assert payload["format"] == FORMAT == "pollinate-model/1"
    assert set(payload) == {
        "format", "spec", "state_dict", "round", "metrics", "hash", "kind", "user", "created_at"
    }  # fmt: skip
    assert payload["spec"] == {
        "name": "mlp",
        "kwargs": {"in_features": F, "num_classes": K, "hidden": 64, "depth": 1},
    }


def test_weights_hash_is_stable_and_order_independent() -> None:
    sd = create_model("mlp", in_features=F, num_classes=K, seed=0).state_dict()
    h = weights_hash(sd)
    assert len(h) == 64 and int(h, 16) >= 0
    assert weights_hash(dict(reversed(sd.items()))) == h
    assert weights_hash({k: v.clone() for k, v in sd.items()}) == h
    assert weights_hash(create_model("mlp", in_features=F, num_classes=K, seed=0).state_dict()) == h

    changed = dict(sd)
    changed["head.bias"] = sd["head.bias"].clone()
    changed["head.bias"][0] += 1e-6
    assert weights_hash(changed) != h
    assert weights_hash({**sd, "head.bias": sd["head.bias"].double()}) != h  # dtype counts
    renamed = {("head.b" if k == "head.bias" else k): v for k, v in sd.items()}
    assert weights_hash(renamed) != h


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    first = save_artifact(path, create_model("logreg", in_features=F, num_classes=K), round=1)
    second = save_artifact(path, create_model("logreg", in_features=F, num_classes=K), round=2)
    assert os.listdir(tmp_path) == ["model.pt"]
    assert first.content_hash != second.content_hash
    assert load_artifact(path).version == second.version  # overwritten


def test_failed_save_keeps_old_file_and_cleans_up(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()

    def broken_save(obj: object, f: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifact_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(saved, create_model("mlp", in_features=F, num_classes=K), round=9)
    assert os.listdir(saved.parent) == [saved.name]
    assert saved.read_bytes() == before


def test_a_linked_name_is_the_round_file_and_outlives_its_replacement(tmp_path: Path) -> None:
    model = create_model("logreg", in_features=F, num_classes=K, seed=0)
    first, latest = tmp_path / "round-1.pt", tmp_path / "latest.pt"
    save_artifact(first, model, round=1)
    save_artifact(latest, model, round=0)  # an older file under the name: replaced
    with latest.open("rb") as reader:  # a reader of the old file ...
        atomic_link(first, latest)
        assert torch.load(reader, weights_only=True)["round"] == 0  # ... keeps reading it
    assert latest.stat().st_ino == first.stat().st_ino  # one file, written once
    assert load_artifact(latest).round == 1
    # The round's name written again (atomic_write: a new file): the link keeps round 1.
    save_artifact(first, create_model("logreg", in_features=F, num_classes=K, seed=1), round=7)
    assert load_artifact(latest).round == 1 and load_artifact(first).round == 7
    assert sorted(os.listdir(tmp_path)) == ["latest.pt", "round-1.pt"]  # no temp name left


def test_without_hard_links_the_name_gets_an_atomic_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, path = tmp_path / "round-1.pt", tmp_path / "latest.pt"
    save_artifact(source, create_model("logreg", in_features=F, num_classes=K), round=1)

    def no_links(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")  # e.g. FAT, some network shares

    monkeypatch.setattr(artifact_module.os, "link", no_links)
    atomic_link(source, path)
    assert path.read_bytes() == source.read_bytes() and path.stat().st_ino != source.stat().st_ino
    assert path.stat().st_mode & 0o777 == source.stat().st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["latest.pt", "round-1.pt"]


def test_save_argument_errors(tmp_path: Path) -> None:
    model = create_model("mlp", in_features=F, num_classes=K)
    path = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="not both"):
        save_artifact(path, model, spec=model.spec, round=0)
    with pytest.raises(ValueError, match="both spec and state_dict"):
        save_artifact(path, spec=model.spec, round=0)
    with pytest.raises(ValueError, match="round must be an int >= 0"):
        save_artifact(path, model, round=-1)
    wrong = ModelSpec("mlp", {**model.spec.kwargs, "hidden": 8})
    with pytest.raises(ArtifactError, match="weights do not fit the architecture"):
        save_artifact(path, spec=wrong, state_dict=model.state_dict(), round=0)
    assert not path.exists()


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "nope.pt", "does not exist")
    assert_one_line_error(tmp_path, "is not a file")


def test_truncated_file(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    assert_one_line_error(saved, "is not a Pollinate model file \\(corrupt or truncated\\)")


@pytest.mark.parametrize("content", [b"", b"\x00", os.urandom(4096), b"PK\x03\x04junk"])
def test_random_bytes(saved: Path, content: bytes) -> None:
    saved.write_bytes(content)
    assert_one_line_error(saved, "is not a Pollinate model file \\(corrupt or truncated\\)")


def test_other_torch_files(saved: Path) -> None:
    torch.save(torch.zeros(3), saved)
    assert_one_line_error(saved, "is not a Pollinate model file \\(no 'format' key\\)")
    torch.save({"format": "pollinate-model/2"}, saved)
    assert_one_line_error(saved, "unsupported format 'pollinate-model/2'")
    torch.save({"format": FORMAT, "spec": {"name": "mlp", "kwargs": {}}}, saved)
    assert_one_line_error(saved, "not a valid Pollinate model file: missing 'state_dict'")


def test_tampered_weights(saved: Path) -> None:
    def bump(payload: dict) -> None:
        payload["state_dict"]["head.bias"][0] += 1.0

    rewrite(saved, bump)
    assert_one_line_error(saved, "weights do not match its content hash")


def test_tampered_hash(saved: Path) -> None:
    rewrite(saved, lambda p: p.update(hash="0" * 64))
    assert_one_line_error(saved, "weights do not match its content hash")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"hidden": 32}, "'body.0.weight' has shape \\(64, 16\\), expected \\(32, 16\\)"),
        ({"depth": 2}, "missing 'body.2.weight' \\(\\+1 more\\)"),
        ({"num_classes": 4}, "'head.weight' has shape"),
        ({"hidden": "wide"}, "invalid model spec: model 'mlp': hidden must be a positive int"),
        ({"bogus": 1}, "invalid model spec: model 'mlp' does not accept bogus"),
    ],
)
def test_mismatched_architecture(saved: Path, kwargs: dict, reason: str) -> None:
    rewrite(saved, lambda p: p["spec"]["kwargs"].update(kwargs))
    assert_one_line_error(saved, f"model 'mlp' weights do not fit the architecture: {reason}")


def test_unknown_model_name_in_file(saved: Path) -> None:
    rewrite(saved, lambda p: p["spec"].update(name="resnet"))
    assert_one_line_error(saved, "invalid model spec: unknown model 'resnet'; choose one of")


def test_artifact_build_keeps_global_rng(saved: Path) -> None:
    artifact = load_artifact(saved)
    assert isinstance(artifact, ModelArtifact)
    rng_before = torch.get_rng_state()
    artifact.build()
    assert torch.equal(torch.get_rng_state(), rng_before)


# ------------------------------------------------------------------- declared model size


@pytest.mark.parametrize(
    ("hidden", "reason"),
    [
        (20_000, "declares 800,240,010 parameters, more than"),  # the parameter cap
        (6_000, "has shape (16, 16), expected (6000, 6000)"),  # under the cap, not in the file
    ],
)
def test_a_declared_huge_model_is_refused_before_it_is_built(
    tmp_path: Path, hidden: int, reason: str
) -> None:
    """A small file whose spec declares a huge MLP: rejected from its spec and tensor shapes,
    without building the model (the process's peak memory does not grow by its size)."""
    import resource

    small = create_model("mlp", in_features=16, num_classes=10, hidden=16, depth=2, seed=0)
    weights = small.state_dict()
    path = tmp_path / "liar.pt"
    spec = {
        "name": "mlp",
        "kwargs": {"in_features": hidden, "num_classes": 10, "hidden": hidden, "depth": 2},
    }
    payload = {
        "format": FORMAT,
        "spec": spec,
        "state_dict": weights,
        "round": 1,
        "metrics": {},
        "hash": weights_hash(weights),
        "kind": "global",
        "user": None,
        "created_at": 0.0,
    }
    torch.save(payload, path)
    assert path.stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(ArtifactError, match="do not fit the architecture") as info:
        load_artifact(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert reason in str(info.value)
    # Building it would allocate >= 6000*6000*2*4 bytes = 275 MiB (20000: 3 GiB).
    assert grown_mib < 100, grown_mib


def test_a_file_larger_than_any_allowed_model_is_not_read(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifact_module, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ArtifactError, match="larger than any allowed model"):
        load_artifact(saved)


def test_parameter_count_matches_a_built_model(name: str) -> None:
    from pollinate.models import parameter_count

    kwargs = {"in_features": 64, "num_classes": 10}
    built = create_model(name, seed=0, **kwargs)
    assert parameter_count(name, **kwargs) == sum(t.numel() for t in built.state_dict().values())
