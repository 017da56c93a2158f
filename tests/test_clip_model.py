"""engine.clip_model: HF CLIPModel <-> open_clip mapping, load_clip, and its error messages.

The mapping is checked against transformers' own CLIPModel (a random ViT-B/32-shaped one, and
tiny ones exercising the activation / LayerNorm eps / EOS-pooling variants).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.model import CLIP
from PIL import Image

from clip_fixtures import TINY_CLIP_CFG, build_clip_suite, tiny_clip_state
from engine.checkpoints import open_checkpoint
from engine.clip_model import (
    LoadedClip,
    check_architecture,
    eval_geometry,
    hf_clip_to_open_clip,
    hf_config_from_open_clip_cfg,
    load_clip,
    new_visual_tower,
    open_clip_cfg_from_hf_config,
    open_clip_to_hf_clip,
)
from engine.errors import CheckpointError, ConfigError

# Every test here is quick (`fast`) except the ViT-B/32 comparison (`slow`). Marked one by one:
# a module-level `pytestmark = fast` would also tag the slow test, and `-m fast` would run it.
fast = pytest.mark.fast


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: one thread is much faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TEXTS = ["a photo of a cat.", "a diagram", "the quick brown fox jumps over the lazy dog"]


def _features(out):
    """transformers 5 get_*_features return a ModelOutput whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter: HF init leaves biases at 0 and LayerNorms at 1, which would
    hide a swapped or dropped bias / LayerNorm in the mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))


def _assert_same_clip(hf_model, oc_model: CLIP, image_size: int, context_length: int) -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size, generator=gen)
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(TEXTS)
    with torch.no_grad():
        hf_image = _features(hf_model.get_image_features(pixel_values=images))
        hf_text = _features(hf_model.get_text_features(input_ids=ids))
        hf_logits = hf_model(input_ids=ids, pixel_values=images).logits_per_image
        oc_image = oc_model.encode_image(images)
        oc_text = oc_model.encode_text(ids)
        image_f, text_f, scale = oc_model(images, ids)
        oc_logits = scale * image_f @ text_f.T
    for ours, theirs in ((oc_image, hf_image), (oc_text, hf_text), (oc_logits, hf_logits)):
        assert ours.shape == theirs.shape
        atol = 1e-4 * float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-4)


@pytest.mark.slow
def test_vit_b32_matches_transformers_clip_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig()  # defaults: ViT-B/32, quick_gelu, projection 512
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(config).eval()
    _randomise(hf_model, seed=0)
    with torch.no_grad():
        hf_model.logit_scale.fill_(3.2)

    cfg = open_clip_cfg_from_hf_config(config.to_dict())
    named = hf_config_from_open_clip_cfg(open_clip.get_model_config("ViT-B-32-quickgelu"))
    assert cfg == open_clip_cfg_from_hf_config(named)  # HF defaults are ViT-B-32-quickgelu
    model = CLIP(**cfg).eval()
    model.load_state_dict(hf_clip_to_open_clip(hf_model.state_dict()), strict=True)
    _assert_same_clip(hf_model, model, image_size=224, context_length=77)


@fast
@pytest.mark.parametrize(
    "hidden_act, eps, eos",
    [("quick_gelu", 1e-5, 49407), ("gelu", 1e-6, 2), ("gelu_pytorch_tanh", 1e-5, 49407)],
)
def test_tiny_hf_variants_match_transformers(hidden_act, eps, eos):
    transformers = pytest.importorskip("transformers")
    hf_cfg = hf_config_from_open_clip_cfg(TINY_CLIP_CFG)
    for tower in ("text_config", "vision_config"):
        hf_cfg[tower].update(hidden_act=hidden_act, layer_norm_eps=eps)
    hf_cfg["text_config"]["eos_token_id"] = eos  # 2: legacy configs, HF pools at argmax
    config = transformers.CLIPConfig(**hf_cfg)
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(config).eval()
    _randomise(hf_model, seed=1)

    cfg = open_clip_cfg_from_hf_config(config.to_dict())
    model = CLIP(**cfg).eval()
    model.load_state_dict(hf_clip_to_open_clip(hf_model.state_dict()), strict=True)
    _assert_same_clip(hf_model, model, image_size=32, context_length=77)


@fast
def test_open_clip_hf_round_trip_is_exact():
    state = tiny_clip_state(seed=3)
    hf_state = open_clip_to_hf_clip(state)
    assert "visual_projection.weight" in hf_state and "text_projection.weight" in hf_state
    assert all(
        k.startswith(("vision_model.", "text_model."))
        for k in hf_state
        if k not in ("visual_projection.weight", "text_projection.weight", "logit_scale")
    )
    back = hf_clip_to_open_clip(hf_state)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    # older transformers saves also hold position_ids buffers: ignored
    legacy = {**hf_state, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert set(hf_clip_to_open_clip(legacy)) == set(state)

    cfg = open_clip_cfg_from_hf_config(hf_config_from_open_clip_cfg(TINY_CLIP_CFG))
    assert cfg["quick_gelu"] is True and cfg["embed_dim"] == 32
    assert cfg["vision_cfg"] == {**TINY_CLIP_CFG["vision_cfg"], "mlp_ratio": 4.0}
    assert cfg["text_cfg"] == {**TINY_CLIP_CFG["text_cfg"], "mlp_ratio": 4.0}


def _write_tiny(root: Path, cfg: dict = TINY_CLIP_CFG, seed: int = 0) -> tuple[Path, Path, Path]:
    """(config json, open_clip safetensors, HF folder) of one tiny CLIP."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in CLIP(**json.loads(json.dumps(cfg))).state_dict().items()}
    config = root / "tiny.json"
    config.write_text(json.dumps(cfg))
    weights = root / "open_clip_model.safetensors"
    safetensors.torch.save_file(state, str(weights))
    hf = root / "hf"
    hf.mkdir()
    safetensors.torch.save_file(open_clip_to_hf_clip(state), str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(hf_config_from_open_clip_cfg(cfg)))
    return config, weights, hf


@fast
def test_load_clip_open_clip_and_hf_layouts_agree(tmp_path):
    config, weights, hf = _write_tiny(tmp_path)
    a = load_clip(open_clip=str(config), weights=weights)
    b = load_clip(hf=hf, label="suite [model]")
    assert isinstance(a, LoadedClip) and isinstance(a.model, CLIP) and not a.model.training
    assert a.arch == str(config) and b.arch == f"hf:{hf}"
    assert a.weights_path == weights and b.weights_path == hf / "model.safetensors"
    assert a.model_cfg == b.model_cfg and a.image_size == b.image_size == 32
    assert a.mean == b.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and len(a.std) == 3
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    assert torch.equal(a.tokenizer(TEXTS), b.tokenizer(TEXTS))
    assert a.text_sha256() == b.text_sha256() and len(a.text_sha256()) == 64

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = a.model.encode_image(images)
        assert torch.equal(b.model.encode_image(images), expected)
        # the eval transform open_clip builds from the model's attached preprocess cfg
        pp = open_clip.get_model_preprocess_cfg(a.model)
        assert pp["size"] == 32 and tuple(pp["mean"]) == a.mean

        # a fresh tower has exactly clip.visual's keys and reproduces it once loaded
        tower = new_visual_tower(a.model_cfg)
        assert list(tower.state_dict()) == list(a.model.visual.state_dict())
        assert not tower.training
        tower.load_state_dict(a.model.visual.state_dict())
        assert torch.equal(tower(images), expected)

    # preprocessing: open_clip's eval geometry (resize shortest side + centre crop) and a key
    key = a.preprocess_key()
    assert key == b.preprocess_key() and key["size"] == 32 and json.loads(json.dumps(key)) == key
    odd = eval_geometry(a)(Image.new("RGB", (50, 30), (10, 20, 30)))
    assert odd.size == (32, 32) and odd.mode == "RGB"

    # a .pt training checkpoint: {"state_dict": {"module.<key>": ...}}
    wrapped = tmp_path / "wrapped.pt"
    state = safetensors.torch.load_file(str(weights))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    c = load_clip(open_clip=str(config), weights=wrapped)
    with torch.no_grad():
        assert torch.equal(c.model.encode_image(images), expected)

    # text_sha256 follows the text tower only
    other = load_clip(open_clip=str(config), weights=weights)
    with torch.no_grad():
        other.model.visual.conv1.weight.add_(1.0)
    assert other.text_sha256() == a.text_sha256()
    other = load_clip(open_clip=str(config), weights=weights)
    with torch.no_grad():
        other.model.ln_final.bias.add_(1e-3)
    assert other.text_sha256() != a.text_sha256()


@fast
def test_named_architecture_builds_without_download(tmp_path, monkeypatch):
    """A built-in name goes through open_clip's registry and open_clip.get_tokenizer(name).

    A tiny config is registered under a name for the test (real built-ins are 100M+ params).
    """
    cfg = {**TINY_CLIP_CFG, "text_cfg": {**TINY_CLIP_CFG["text_cfg"], "context_length": 20}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Tiny-ViT-test", cfg)
    _, weights, _ = _write_tiny(tmp_path, cfg)
    loaded = load_clip(open_clip="Tiny-ViT-test", weights=weights)
    assert loaded.arch == "Tiny-ViT-test" and loaded.image_size == 32
    assert loaded.tokenizer(TEXTS).shape == (3, 20)
    assert torch.equal(loaded.tokenizer(TEXTS), open_clip.get_tokenizer("Tiny-ViT-test")(TEXTS))
    state = safetensors.torch.load_file(str(weights))
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state[key]), key


@fast
def test_clip_suite_layouts_hold_identical_weights(tmp_path):
    suite_oc = build_clip_suite(tmp_path / "oc")
    suite_hf = build_clip_suite(tmp_path / "hf", layout="hf")
    assert suite_oc.name == "suite.toml" and "[tasks.gamma]" in suite_hf.read_text()
    a = load_clip(
        open_clip=str(tmp_path / "oc/tiny_clip.json"),
        weights=tmp_path / "oc/clip/open_clip_model.safetensors",
    )
    b = load_clip(hf=tmp_path / "hf/clip-hf")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.model.encode_image(images), b.model.encode_image(images))
    assert a.text_sha256() == b.text_sha256()
    for name in ("alpha", "beta", "gamma"):
        oc, hf = (
            open_checkpoint(tmp_path / f"oc/ft/{name}.safetensors"),
            open_checkpoint(tmp_path / f"hf/ft/{name}"),
        )
        assert set(oc.keys()) - set(hf.keys()) == {"visual_projection.weight"}
        assert all(torch.equal(oc.tensor(k), hf.tensor(k)) for k in hf.keys())  # noqa: SIM118
        assert torch.equal(oc.tensor("visual_projection.weight"), a.model.visual.proj.t())
    assert len(list((tmp_path / "oc/data/beta").glob("test-0000?-of-00002.parquet"))) == 2


# --------------------------------------------------------------------------------------------
# Errors: the right class, one line, naming the file, and no warnings on the way.
# --------------------------------------------------------------------------------------------


def _load_error(**kwargs) -> Exception:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises((ConfigError, CheckpointError)) as info:
            load_clip(**kwargs)
    assert not caught, [str(w.message) for w in caught]
    message = str(info.value)
    assert "\n" not in message and message
    return info.value


@fast
def test_unknown_architecture_name(tmp_path):
    _, weights, _ = _write_tiny(tmp_path)
    error = _load_error(open_clip="ViT-B-33", weights=weights)
    assert isinstance(error, ConfigError)
    assert "ViT-B-33" in str(error) and "ViT-B-32" in str(error)
    error = _load_error(open_clip="hf-hub:laion/CLIP-ViT-B-32", weights=weights)
    assert isinstance(error, ConfigError) and "hf-hub:" in str(error)
    with pytest.raises(ConfigError, match="ViT-B-33"):
        check_architecture("ViT-B-33")
    assert check_architecture("ViT-B/32")["vision_cfg"]["patch_size"] == 32


@fast
def test_unsupported_or_malformed_configs(tmp_path):
    _, weights, _ = _write_tiny(tmp_path)
    error = _load_error(open_clip="RN50", weights=weights)  # ResNet image tower
    assert isinstance(error, ConfigError) and "RN50" in str(error)
    error = _load_error(open_clip="ViT-B-16-SigLIP", weights=weights)  # CustomTextCLIP
    assert isinstance(error, ConfigError) and "custom_text" in str(error)
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 32, "vision_cfg": {')
    error = _load_error(open_clip=str(bad), weights=weights)
    assert isinstance(error, ConfigError) and str(bad) in str(error)
    bad.write_text(json.dumps({"embed_dim": 32, "vision_cfg": TINY_CLIP_CFG["vision_cfg"]}))
    error = _load_error(open_clip=str(bad), weights=weights)
    assert isinstance(error, ConfigError) and "text_cfg" in str(error) and str(bad) in str(error)
    error = _load_error(open_clip=str(tmp_path / "nope.json"), weights=weights)
    assert isinstance(error, ConfigError) and "nope.json" in str(error)


@fast
def test_missing_weights_file(tmp_path):
    config, _, _ = _write_tiny(tmp_path)
    missing = tmp_path / "missing.safetensors"
    error = _load_error(open_clip=str(config), weights=missing)
    assert isinstance(error, CheckpointError) and str(missing) in str(error)
    error = _load_error(hf=tmp_path / "no-such-folder")
    assert isinstance(error, ConfigError) and "no-such-folder" in str(error)


@fast
def test_weights_for_another_architecture(tmp_path):
    config, _, _ = _write_tiny(tmp_path / "a")
    wider = json.loads(json.dumps(TINY_CLIP_CFG))
    wider["vision_cfg"]["patch_size"] = 16
    _, other_weights, other_hf = _write_tiny(tmp_path / "b", wider)
    error = _load_error(open_clip=str(config), weights=other_weights)
    assert isinstance(error, CheckpointError)
    assert str(other_weights) in str(error) and "tensor 'visual." in str(error)
    assert "shape" in str(error)


@fast
def test_missing_tensor_and_image_only_checkpoints(tmp_path):
    config, weights, _ = _write_tiny(tmp_path)
    state = safetensors.torch.load_file(str(weights))
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file(
        {k: v for k, v in state.items() if k != "visual.ln_post.bias"}, str(partial)
    )
    error = _load_error(open_clip=str(config), weights=partial)
    assert isinstance(error, CheckpointError)
    assert str(partial) in str(error) and "visual.ln_post.bias" in str(error)
    image_only = tmp_path / "image_only.safetensors"
    safetensors.torch.save_file(
        {k: v for k, v in state.items() if k.startswith("visual.")}, str(image_only)
    )
    error = _load_error(open_clip=str(config), weights=image_only)
    assert isinstance(error, CheckpointError) and "text tower" in str(error)


@fast
def test_pickled_module_is_refused_without_warnings(tmp_path):
    config, _, _ = _write_tiny(tmp_path)
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 4), pickled)
    error = _load_error(open_clip=str(config), weights=pickled)  # asserts no warning
    assert isinstance(error, CheckpointError)
    assert str(pickled) in str(error) and "pickled" in str(error)


@fast
def test_truncated_safetensors(tmp_path):
    config, weights, hf = _write_tiny(tmp_path)
    data = weights.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    error = _load_error(open_clip=str(config), weights=truncated)
    assert isinstance(error, CheckpointError)
    assert str(truncated) in str(error) and "truncated" in str(error)
    hf_file = hf / "model.safetensors"
    hf_file.write_bytes(hf_file.read_bytes()[:1000])
    error = _load_error(hf=hf, label="suite.toml [model]")
    assert isinstance(error, CheckpointError)
    assert str(hf_file) in str(error) and str(error).startswith("suite.toml [model]: ")


@fast
def test_hf_vision_only_folder_is_refused(tmp_path):
    folder = tmp_path / "expert"
    folder.mkdir()
    vision_config = hf_config_from_open_clip_cfg(TINY_CLIP_CFG)["vision_config"]
    (folder / "config.json").write_text(json.dumps(vision_config))  # a CLIPVisionModel's
    error = _load_error(hf=folder)
    assert isinstance(error, ConfigError) and "CLIPVisionModel" in str(error)
    assert str(folder / "config.json") in str(error)
