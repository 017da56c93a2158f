"""Checkpoint loading, key normalisation, validation and atomic saving (docs/checkpoints.md).

Everything runs on a tiny open_clip ViT (width 32, 2 layers) built here, so no download is needed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from open_clip.model import VisionTransformer
from safetensors.torch import save_file

from engine.checkpoints import (
    CANONICAL_FORMAT,
    CheckpointReader,
    canonical_to_open_clip,
    check_finite,
    open_checkpoint,
    open_clip_to_canonical,
    read_metadata,
    save_safetensors,
    validate_compatible,
)
from engine.errors import CheckpointError

pytestmark = pytest.mark.fast  # tiny towers built here: every test runs in well under a second

LAYERS = 2
TOWER = dict(
    image_size=32, patch_size=8, width=32, layers=LAYERS, heads=2, mlp_ratio=4.0, output_dim=16
)


def canonical_keys(layers: int = LAYERS) -> list[str]:
    """The HF CLIPVisionModel layout without `vision_model.`, written out by hand."""
    keys = [
        "embeddings.class_embedding",
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "pre_layrnorm.weight",
        "pre_layrnorm.bias",
        "post_layernorm.weight",
        "post_layernorm.bias",
        "visual_projection.weight",
    ]
    for i in range(layers):
        for p in ("weight", "bias"):
            keys += [f"encoder.layers.{i}.self_attn.{m}_proj.{p}" for m in ("q", "k", "v", "out")]
            keys += [f"encoder.layers.{i}.layer_norm{n}.{p}" for n in (1, 2)]
            keys += [f"encoder.layers.{i}.mlp.fc{n}.{p}" for n in (1, 2)]
    return sorted(keys)


@pytest.fixture(scope="module")
def tower() -> VisionTransformer:
    """A tiny open_clip image tower with every parameter perturbed, so that a swapped mapping
    (ln_1 vs ln_2, q vs k) changes the output instead of hiding behind ones and zeros."""
    torch.manual_seed(0)
    model = VisionTransformer(**TOWER).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def open_clip_sd(tower: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tower.state_dict().items()}


@pytest.fixture(scope="module")
def canonical(open_clip_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors, _ = open_clip_to_canonical({"visual." + k: v for k, v in open_clip_sd.items()})
    return {k: v.clone() for k, v in tensors.items()}


# Leftovers of the text tower that open_clip / task_vectors saves keep.
TEXT_LEFTOVERS = {
    "token_embedding.weight": torch.zeros(10, 32),
    "positional_embedding": torch.zeros(7, 32),
    "ln_final.weight": torch.ones(32),
    "ln_final.bias": torch.zeros(32),
    "text_projection": torch.zeros(32, 16),
    "logit_scale": torch.tensor(4.6),
    "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32),
}


# --- open_clip -------------------------------------------------------------------------------


def test_open_clip_files_normalise_to_the_hf_layout(tmp_path: Path, open_clip_sd) -> None:
    st_path = tmp_path / "expert.safetensors"
    save_file({"visual." + k: v for k, v in open_clip_sd.items()} | TEXT_LEFTOVERS, st_path)
    pt_path = tmp_path / "expert.pt"  # task_vectors' ImageEncoder adds `model.`
    torch.save({"model.visual." + k: v for k, v in open_clip_sd.items()}
               | {"model." + k: v for k, v in TEXT_LEFTOVERS.items()}, pt_path)

    for path, prefix in ((st_path, ""), (pt_path, "model.")):
        reader = open_checkpoint(path)
        assert reader.format == "open_clip"
        assert reader.keys() == canonical_keys()
        assert reader.dropped_keys == sorted(prefix + k for k in TEXT_LEFTOVERS)
        for i in range(LAYERS):
            fused = open_clip_sd[f"transformer.resblocks.{i}.attn.in_proj_weight"]
            fused_bias = open_clip_sd[f"transformer.resblocks.{i}.attn.in_proj_bias"]
            for part, which in enumerate("qkv"):
                name = f"encoder.layers.{i}.self_attn.{which}_proj"
                assert torch.equal(reader.tensor(name + ".weight"), fused.chunk(3, dim=0)[part])
                assert torch.equal(reader.tensor(name + ".bias"), fused_bias.chunk(3)[part])
        assert torch.equal(reader.tensor("visual_projection.weight"), open_clip_sd["proj"].T)
        assert torch.equal(reader.tensor("pre_layrnorm.bias"), open_clip_sd["ln_pre.bias"])
        assert torch.equal(reader.tensor("encoder.layers.1.layer_norm2.weight"),
                           open_clip_sd["transformer.resblocks.1.ln_2.weight"])
        # spec() comes from the header and agrees with what tensor() reads.
        for name in reader.keys():
            tensor = reader.tensor(name)
            assert reader.spec(name) == (tuple(tensor.shape), tensor.dtype)


def test_bare_open_clip_tower_without_prefix(tmp_path: Path, open_clip_sd, canonical) -> None:
    save_file(open_clip_sd, tmp_path / "bare.safetensors")
    reader = open_checkpoint(tmp_path / "bare.safetensors")
    assert reader.keys() == canonical_keys() and reader.dropped_keys == []
    assert all(torch.equal(reader.tensor(k), canonical[k]) for k in reader.keys())


def test_canonical_round_trips_into_an_open_clip_tower(tmp_path: Path, tower, open_clip_sd) -> None:
    save_file({"visual." + k: v for k, v in open_clip_sd.items()}, tmp_path / "tower.safetensors")
    reader = open_checkpoint(tmp_path / "tower.safetensors")
    canonical = {name: reader.tensor(name) for name in reader.keys()}

    back = canonical_to_open_clip(canonical)
    assert back.keys() == open_clip_sd.keys()
    assert all(torch.equal(back[k], open_clip_sd[k]) for k in open_clip_sd)  # bit-exact

    fresh = VisionTransformer(**TOWER).eval()
    fresh.load_state_dict(back, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), tower(images))

    assert all(k.startswith("visual.") for k in canonical_to_open_clip(canonical, prefix="visual."))


def test_eager_conversion_matches_the_reader(tmp_path: Path, open_clip_sd) -> None:
    state = {"model.visual." + k: v for k, v in open_clip_sd.items()}
    state["model.logit_scale"] = torch.tensor(1.0)
    eager, dropped = open_clip_to_canonical(state)
    torch.save(state, tmp_path / "encoder.pt")
    reader = open_checkpoint(tmp_path / "encoder.pt")
    assert sorted(eager) == reader.keys()
    assert dropped == reader.dropped_keys == ["model.logit_scale"]
    assert all(torch.equal(eager[k], reader.tensor(k)) for k in eager)


def test_canonical_to_open_clip_needs_all_of_q_k_v(canonical) -> None:
    partial = dict(canonical)
    del partial["encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="in_proj_weight"):
        canonical_to_open_clip(partial)


# --- Hugging Face ----------------------------------------------------------------------------


def hf_state_dict(canonical: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A full-CLIPModel-like HF dict: the vision tower under `prefix`, plus text leftovers."""
    state = {prefix + k: v for k, v in canonical.items() if k != "visual_projection.weight"}
    return state | {
        prefix + "embeddings.position_ids": torch.arange(17).unsqueeze(0),  # older saves
        "visual_projection.weight": canonical["visual_projection.weight"],
        "text_model.embeddings.token_embedding.weight": torch.zeros(10, 32),
        "text_model.embeddings.position_ids": torch.arange(7).unsqueeze(0),
        "text_projection.weight": torch.zeros(16, 32),
        "logit_scale": torch.tensor(4.6),
    }


@pytest.mark.parametrize("prefix", ["vision_model.", ""])  # transformers < 5 / >= 5
def test_hf_layout_with_or_without_vision_model_prefix(tmp_path: Path, canonical, prefix) -> None:
    save_file(hf_state_dict(canonical, prefix), tmp_path / "hf.safetensors")
    reader = open_checkpoint(tmp_path / "hf.safetensors")
    assert reader.format == "hf_clip_vision"
    assert reader.keys() == canonical_keys()  # position_ids skipped silently
    assert reader.dropped_keys == [
        "logit_scale", "text_model.embeddings.token_embedding.weight", "text_projection.weight"
    ]
    assert all(torch.equal(reader.tensor(k), canonical[k]) for k in reader.keys())


def test_hf_directory_with_pytorch_model_bin(tmp_path: Path, canonical) -> None:
    torch.save(hf_state_dict(canonical, "vision_model."), tmp_path / "pytorch_model.bin")
    reader = open_checkpoint(tmp_path)
    assert reader.keys() == canonical_keys()


@pytest.mark.parametrize("weights, save", [
    ("model.safetensors", lambda tensors, path: save_file(tensors, path)),
    ("pytorch_model.bin", lambda tensors, path: torch.save(tensors, path)),
])
def test_sharded_hf_directory(tmp_path: Path, canonical, weights, save) -> None:
    state = hf_state_dict(canonical, "vision_model.")
    names = sorted(state)
    stem, ext = weights.split(".")
    shards = {
        f"{stem}-00001-of-00002.{ext}": names[::2],
        f"{stem}-00002-of-00002.{ext}": names[1::2],
    }
    for shard, keys in shards.items():
        save({k: state[k] for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / f"{weights}.index.json").write_text(json.dumps({"weight_map": weight_map}))

    reader = open_checkpoint(tmp_path)
    assert reader.keys() == canonical_keys()
    assert all(torch.equal(reader.tensor(k), canonical[k]) for k in reader.keys())
    assert len(reader.sha256()) == 64 and reader.sha256() == open_checkpoint(tmp_path).sha256()

    (tmp_path / f"{stem}-00002-of-00002.{ext}").unlink()
    with pytest.raises(CheckpointError, match=f"{stem}-00002-of-00002.{ext}.*missing"):
        open_checkpoint(tmp_path)


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.pt"])
def test_truncated_file_is_reported_with_its_path(tmp_path: Path, open_clip_sd, name) -> None:
    path = tmp_path / name
    state = {"visual." + k: v for k, v in open_clip_sd.items()}
    save_file(state, path) if name.endswith(".safetensors") else torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _write(path: Path, content: object) -> Path:
    if content is None:
        pass
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif path.suffix == ".safetensors":
        save_file(content, path)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("weights.npz", b"x", "unsupported file type"),
    ("nowhere.safetensors", None, "no such file"),
    (".", None, "no model weights"),  # a directory without weights
    ("empty.pt", {}, "no tensors"),
    ("list.pt", [torch.ones(1)], "not a state dict"),
    ("foo.safetensors", {"foo.weight": torch.ones(1)}, "unrecognised key layout.*'foo.weight'"),
    ("text.safetensors", {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(1)},
     "no vision-tower tensors"),
])
def test_unusable_sources_raise_one_line_errors(tmp_path: Path, name, content, expected) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(CheckpointError, match=expected) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_unknown_vision_tensor_is_named(tmp_path: Path, open_clip_sd) -> None:
    state = {"visual." + k: v for k, v in open_clip_sd.items()}
    state["visual.attn_pool.weight"] = torch.ones(1)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="visual.attn_pool.weight"):
        open_checkpoint(tmp_path / "odd.safetensors")


def test_state_dict_entry_of_a_training_checkpoint_is_used(tmp_path: Path, open_clip_sd) -> None:
    torch.save({"epoch": 3, "state_dict": {"visual." + k: v for k, v in open_clip_sd.items()}},
               tmp_path / "train.pth")
    assert open_checkpoint(tmp_path / "train.pth").keys() == canonical_keys()


def test_legacy_torch_format_is_loaded_without_mmap(tmp_path, open_clip_sd, canonical) -> None:
    state = {"visual." + k: v for k, v in open_clip_sd.items()}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    reader = open_checkpoint(tmp_path / "old.pt")
    assert all(torch.equal(reader.tensor(k), canonical[k]) for k in reader.keys())


TRIPPED: list[str] = []


def _trip() -> None:
    TRIPPED.append("code ran while loading")


class Exploit:
    """What a malicious checkpoint does: make unpickling call a function of its choice."""

    def __reduce__(self):
        return (_trip, ())


class PickledEncoder(torch.nn.Module):
    """Stands in for task_vectors' ImageEncoder, which is saved as a whole module."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)

    def __setstate__(self, state) -> None:
        TRIPPED.append("module rebuilt")
        super().__setstate__(state)


@pytest.mark.parametrize("payload", [PickledEncoder(), {"visual.conv1.weight": Exploit()}])
def test_pickled_objects_are_refused_without_being_unpickled(tmp_path: Path, payload) -> None:
    TRIPPED.clear()
    torch.save(payload, tmp_path / "finetuned.pt")
    with pytest.raises(CheckpointError, match="pickled.*unsafe.*convert it offline"):
        open_checkpoint(tmp_path / "finetuned.pt")
    assert TRIPPED == []


# --- validation ------------------------------------------------------------------------------


def _changed(canonical: dict[str, torch.Tensor], change: str) -> dict[str, torch.Tensor]:
    tensors = dict(canonical)
    if change == "shape":
        tensors["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    elif change == "missing":
        del tensors["encoder.layers.1.mlp.fc1.weight"]
    elif change == "extra":
        tensors["encoder.layers.2.mlp.fc1.weight"] = torch.zeros(128, 32)
    elif change == "dtype":
        tensors["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(128, 32, dtype=torch.float16)
    return tensors


@pytest.mark.parametrize("change, expected", [
    ("shape", r"tensor 'encoder.layers.1.mlp.fc1.weight' has shape \(64, 32\) "
              r"but the pretrained model has \(128, 32\)"),
    ("missing", "is missing tensor 'encoder.layers.1.mlp.fc1.weight' present in the pretrained"),
    ("extra", "has extra tensor 'encoder.layers.2.mlp.fc1.weight'"),
    ("dtype", "tensor 'encoder.layers.1.mlp.fc1.weight' has dtype torch.float16"),
])
def test_validate_compatible_names_file_and_tensor(tmp_path, canonical, change, expected) -> None:
    save_file(canonical, tmp_path / "base.safetensors")
    save_file(canonical, tmp_path / "good.safetensors")
    save_file(_changed(canonical, change), tmp_path / "svhn.safetensors")
    readers = [open_checkpoint(tmp_path / f"{n}.safetensors") for n in ("base", "good", "svhn")]
    with pytest.raises(CheckpointError, match=f"svhn.safetensors: {expected}"):
        validate_compatible(readers)


def _without(canonical: dict[str, torch.Tensor], *names: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in canonical.items() if k not in names}


def _readers(tmp_path: Path, **states: dict[str, torch.Tensor]) -> list[CheckpointReader]:
    for name, tensors in states.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
    return [open_checkpoint(tmp_path / f"{name}.safetensors") for name in states]


def test_validate_compatible_reads_no_tensor_data(tmp_path: Path, canonical, monkeypatch) -> None:
    save_file(canonical, tmp_path / "a.safetensors")
    save_file(canonical, tmp_path / "b.safetensors")
    no_proj = _without(canonical, "visual_projection.weight")
    save_file(no_proj, tmp_path / "c.safetensors")
    save_file(no_proj, tmp_path / "d.safetensors")
    monkeypatch.setattr(CheckpointReader, "tensor", lambda self, name: pytest.fail("data was read"))
    assert validate_compatible([open_checkpoint(tmp_path / f"{n}.safetensors") for n in "ab"]) == []
    assert validate_compatible([open_checkpoint(tmp_path / f"{n}.safetensors") for n in "acd"]) == [
        "visual_projection.weight"]


def test_validate_compatible_returns_the_tensors_no_expert_has(tmp_path: Path, canonical) -> None:
    """FusionBench-style experts (HF CLIPVisionModel, no projection): those tensors stay at θ_0."""
    absent = ["post_layernorm.bias", "visual_projection.weight"]
    readers = _readers(tmp_path, base=canonical, svhn=_without(canonical, *absent),
                       mnist=_without(canonical, *absent))
    assert validate_compatible(readers) == absent  # sorted
    assert validate_compatible(readers[:2]) == absent  # one expert alone lacks them: kept as well
    assert validate_compatible(readers[:1]) == []  # the pretrained model alone: nothing to compare
    assert validate_compatible([]) == []
    assert validate_compatible(_readers(tmp_path, base2=canonical, full=canonical)) == []


def test_a_tensor_that_only_some_experts_lack_is_still_an_error(tmp_path: Path, canonical) -> None:
    name = "visual_projection.weight"
    readers = _readers(tmp_path, base=canonical, good=canonical, svhn=_without(canonical, name),
                       mnist=_without(canonical, name))
    with pytest.raises(CheckpointError, match=f"svhn.safetensors: is missing tensor '{name}' present in the "
                                              "pretrained model; all checkpoints must be fine-tuned from the "
                                              "same base model as .*base.safetensors"):
        validate_compatible(readers)
    # the expert that has it may come last: still an error, naming the first expert that lacks it
    with pytest.raises(CheckpointError, match=f"svhn.safetensors: is missing tensor '{name}'"):
        validate_compatible([readers[0], readers[2], readers[3], readers[1]])


@pytest.mark.parametrize("change, expected", [
    ("shape", r"tensor 'encoder.layers.1.mlp.fc1.weight' has shape \(64, 32\)"),
    ("dtype", "tensor 'encoder.layers.1.mlp.fc1.weight' has dtype torch.float16"),
    ("extra", "has extra tensor 'encoder.layers.2.mlp.fc1.weight'"),
])
def test_experts_without_the_projection_are_still_checked_tensor_by_tensor(tmp_path, canonical, change,
                                                                           expected) -> None:
    no_proj = _without(canonical, "visual_projection.weight")
    readers = _readers(tmp_path, base=canonical, good=no_proj,
                       svhn=_without(_changed(canonical, change), "visual_projection.weight"))
    with pytest.raises(CheckpointError, match=f"svhn.safetensors: {expected}"):
        validate_compatible(readers)


def test_task_vectors_leave_tensors_no_expert_has_at_theta0(tmp_path: Path, canonical) -> None:
    from engine.task_vectors import TaskVectorStack

    gen = torch.Generator().manual_seed(5)
    absent = "visual_projection.weight"
    experts = []
    for i in range(2):
        tensors = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in _without(canonical, absent).items()}
        save_file(tensors, tmp_path / f"expert{i}.safetensors")
        experts.append(tmp_path / f"expert{i}.safetensors")
    save_file(canonical, tmp_path / "base.safetensors")
    stack = TaskVectorStack.from_files(tmp_path / "base.safetensors", experts, ["a", "b"])
    assert stack.kept_from_base == [absent]
    assert absent not in stack.names and set(stack.names) == set(canonical) - {absent}
    assert stack.subset(["b"]).kept_from_base == [absent]
    merged = stack.apply(stack.data.sum(0))
    assert torch.equal(merged[absent], canonical[absent])  # θ_0's, bit for bit
    name = "encoder.layers.0.mlp.fc1.weight"
    expected = canonical[name] + sum(open_checkpoint(p).tensor(name) - canonical[name] for p in experts)
    assert torch.allclose(merged[name], expected, atol=1e-6)
    # experts that have every tensor: nothing kept
    full = TaskVectorStack.from_files(tmp_path / "base.safetensors", [tmp_path / "base.safetensors"], ["same"])
    assert full.kept_from_base == [] and absent in full.names
    # one expert with the tensor and one without: refused before anything is read
    with pytest.raises(CheckpointError, match=f"expert0.safetensors: is missing tensor '{absent}'"):
        TaskVectorStack.from_files(tmp_path / "base.safetensors", [tmp_path / "base.safetensors", experts[0]],
                                   ["same", "a"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite(bad: float) -> None:
    check_finite("pre_layrnorm.weight", torch.ones(4), "ok.safetensors")
    tensor = torch.ones(4)
    tensor[2] = bad
    expected = "svhn.safetensors: tensor 'pre_layrnorm.weight' contains NaN or Inf"
    with pytest.raises(CheckpointError, match=expected):
        check_finite("pre_layrnorm.weight", tensor, "svhn.safetensors")


# --- saving ----------------------------------------------------------------------------------


def test_save_round_trips_tensors_and_metadata(tmp_path: Path, canonical) -> None:
    metadata = {"method": "ties", "hyperparameters": {"k": 0.2, "lambda": 1.0}, "sources": ["ab12"]}
    path = save_safetensors(tmp_path / "merged.safetensors", canonical, metadata)
    assert read_metadata(path) == metadata

    reader = open_checkpoint(path)
    assert reader.format == CANONICAL_FORMAT and reader.keys() == canonical_keys()
    assert all(torch.equal(reader.tensor(k), canonical[k]) for k in reader.keys())
    assert reader.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert os.listdir(tmp_path) == ["merged.safetensors"]


def test_save_accepts_views_that_share_memory(tmp_path: Path, open_clip_sd) -> None:
    # q, k and v come back as views of one in_proj storage, which safetensors alone would refuse.
    views, _ = open_clip_to_canonical({"visual." + k: v for k, v in open_clip_sd.items()})
    path = save_safetensors(tmp_path / "views.safetensors", views, {})
    assert read_metadata(path) == {}
    assert open_checkpoint(path).keys() == canonical_keys()


def test_save_refuses_other_extensions(tmp_path: Path, canonical) -> None:
    with pytest.raises(CheckpointError, match=r"merged.pt: .*\.safetensors"):
        save_safetensors(tmp_path / "merged.pt", canonical, {})


def test_failed_save_leaves_the_existing_file_intact(tmp_path, canonical, monkeypatch) -> None:
    target = tmp_path / "merged.safetensors"
    save_safetensors(target, canonical, {"run": 1})
    before = target.read_bytes()

    def crash_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_half_way)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_safetensors(target, canonical, {"run": 2})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["merged.safetensors"]  # no temp file left behind

