"""Load a user's full CLIP model (image + text towers) as one `open_clip.model.CLIP`.

Users bring their CLIP in one of two shapes:

* an open_clip architecture -- a built-in name such as "ViT-B-32" / "ViT-B-32-quickgelu", or a
  path to an open_clip model-config JSON (`model_configs/*.json` schema, or the hub's
  `open_clip_config.json` wrapper) -- plus a full CLIP weights file (.safetensors, or a
  .pt/.pth/.bin state dict, optionally under "state_dict" and/or with a "module." prefix);
* a Hugging Face `CLIPModel` folder (config.json + model.safetensors / pytorch_model.bin).

Both end up in the same place: the HF config is translated into an open_clip model cfg, the HF
weights are renamed into open_clip's keys, and an `open_clip.model.CLIP` is built and loaded
with strict=True. Everything downstream (tokenizer, zero-shot heads, eval preprocessing, the
vision tower merged weights are loaded into) is then open_clip's own code, so there is exactly
one forward pass to trust, whichever format the user had.

HF CLIP and open_clip CLIP compute the same function once the weights are renamed (checked
against transformers' own CLIPModel in tests/test_clip_model.py):
* activation: HF `hidden_act` "quick_gelu" <-> open_clip `quick_gelu: true` (one flag for both
  towers); "gelu" <-> nn.GELU; "gelu_new"/"gelu_pytorch_tanh" <-> nn.GELU(approximate="tanh");
* LayerNorm eps: both default to 1e-5; another HF `layer_norm_eps` becomes open_clip
  `norm_kwargs: {"eps": ...}`;
* text pooling: open_clip takes the token at argmax(token id); HF takes the first
  `eos_token_id` (49407), or argmax for legacy configs with eos_token_id == 2. open_clip's
  tokenizer ends every sequence with end-of-text 49407, the largest id it emits, so both pick
  the same position; pad ids differ (0 vs 1) but sit after it under a causal mask;
* projections: HF nn.Linear weights [out, in] are open_clip's `proj` / `text_projection`
  [in, out] transposed; HF q/k/v projections are open_clip's fused `in_proj` (q;k;v rows).

Only plain CLIP ViTs are accepted (no timm/ResNet image towers, no HF text towers, no layer
scale or other block variants): merged vision towers must map onto engine.checkpoints'
canonical names. Nothing is downloaded and nothing is unpickled beyond weights_only=True.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, _build_vision_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import Tensor, nn
from torchvision.transforms import Compose, ToTensor

from engine.checkpoints import (
    QKV,
    _first_line,
    _locate,
    _safe_open,
    _torch_load,
    canonical_to_open_clip,
    key_pattern,
    open_clip_to_canonical,
)
from engine.errors import CheckpointError, ConfigError

OPENAI_MEAN: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_MEAN)  # type: ignore[assignment]
OPENAI_STD: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_STD)  # type: ignore[assignment]

# CLIP's BPE vocabulary: open_clip's SimpleTokenizer emits ids < 49408, end-of-text is 49407.
CLIP_VOCAB_SIZE = 49408
CLIP_EOT_ID = 49407

# --------------------------------------------------------------------------------------------
# Key mapping, HF CLIPModel <-> open_clip CLIP. The vision side reuses engine.checkpoints'
# canonical table (canonical = HF CLIPVisionModel names without `vision_model.`); the text side
# is written here once. `{i}` is a layer index, `{p}` weight|bias, `{qkv}` q|k|v.
# --------------------------------------------------------------------------------------------

_TEXT_RULES: tuple[tuple[str, str, str], ...] = (  # (open_clip, HF CLIPModel, op)
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "copy"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", "copy"),
    ("transformer.resblocks.{i}.ln_1.{p}", "text_model.encoder.layers.{i}.layer_norm1.{p}", "copy"),
    ("transformer.resblocks.{i}.ln_2.{p}", "text_model.encoder.layers.{i}.layer_norm2.{p}", "copy"),
    (
        "transformer.resblocks.{i}.attn.in_proj_{p}",
        "text_model.encoder.layers.{i}.self_attn.{qkv}_proj.{p}",
        "qkv",
    ),
    (
        "transformer.resblocks.{i}.attn.out_proj.{p}",
        "text_model.encoder.layers.{i}.self_attn.out_proj.{p}",
        "copy",
    ),
    ("transformer.resblocks.{i}.mlp.c_fc.{p}", "text_model.encoder.layers.{i}.mlp.fc1.{p}", "copy"),
    (
        "transformer.resblocks.{i}.mlp.c_proj.{p}",
        "text_model.encoder.layers.{i}.mlp.fc2.{p}",
        "copy",
    ),
    ("ln_final.{p}", "text_model.final_layer_norm.{p}", "copy"),
    ("text_projection", "text_projection.weight", "transpose"),
    ("logit_scale", "logit_scale", "copy"),
)
_TEXT_COMPILED = tuple(
    (open_clip_name, hf_name, op, key_pattern(open_clip_name), key_pattern(hf_name))
    for open_clip_name, hf_name, op in _TEXT_RULES
)
_HF_VISION_PREFIX = "vision_model."
_VISUAL_PREFIX = "visual."


def hf_clip_to_open_clip(
    state: Mapping[str, Tensor], *, label: str = "<state dict>"
) -> dict[str, Tensor]:
    """HF `CLIPModel` state dict -> open_clip `CLIP` state dict (strict-loadable).

    `*.position_ids` buffers (older transformers saves) are skipped; any other key outside the
    CLIPModel layout raises CheckpointError naming `label`.
    """
    canonical: dict[str, Tensor] = {}  # vision tower, engine.checkpoints' canonical names
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(_HF_VISION_PREFIX):
            canonical[key[len(_HF_VISION_PREFIX) :]] = tensor
            continue
        if key == "visual_projection.weight":
            canonical[key] = tensor
            continue
        for open_clip_name, _, op, _, hf_re in _TEXT_COMPILED:
            if m := hf_re.fullmatch(key):
                fields = m.groupdict()
                target = open_clip_name.format(**fields)
                if op == "qkv":
                    fused.setdefault(target, {})[fields["qkv"]] = tensor
                elif op == "transpose":
                    out[target] = tensor.t().contiguous()
                else:
                    out[target] = tensor
                break
        else:
            raise CheckpointError(
                f"{label}: tensor '{key}' is not part of a Hugging Face CLIPModel (expected "
                f"vision_model.*, text_model.*, visual_projection, text_projection, logit_scale)"
            )
    for target, parts in fused.items():
        if set(parts) != set(QKV):
            raise CheckpointError(
                f"{label}: cannot rebuild '{target}': q, k and v projections must all be present "
                f"(got {', '.join(sorted(parts))})"
            )
        out[target] = _cat_qkv(parts, target, label)
    if not canonical:
        raise CheckpointError(f"{label}: has no 'vision_model.*' tensors; not a CLIPModel")
    try:
        out.update(canonical_to_open_clip(canonical, prefix=_VISUAL_PREFIX))
    except CheckpointError as exc:  # relabel: it names "<state dict>" and canonical keys
        raise CheckpointError(_relabel(str(exc), label)) from exc
    except RuntimeError as exc:  # torch.cat of q, k, v with mismatched shapes
        raise CheckpointError(
            f"{label}: vision q/k/v projections do not fit together ({_first_line(exc)})"
        ) from exc
    return out


def _cat_qkv(parts: Mapping[str, Tensor], target: str, label: str) -> Tensor:
    try:
        return torch.cat([parts[which] for which in QKV], dim=0)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{label}: q, k and v projections for '{target}' do not fit together "
            f"({_first_line(exc)})"
        ) from exc


def open_clip_to_hf_clip(
    state: Mapping[str, Tensor], *, label: str = "<state dict>"
) -> dict[str, Tensor]:
    """open_clip `CLIP` state dict -> HF `CLIPModel` keys, as transformers 5 saves them.

    Keys carry the `vision_model.` / `text_model.` prefixes and no `position_ids` buffers
    (transformers 5.24 writes exactly these names). Every returned tensor owns its memory,
    so the dict can go straight to safetensors.torch.save_file.
    """
    state = {k: v for k, v in state.items() if k != "attn_mask"}
    visual = {k: v for k, v in state.items() if k.startswith(_VISUAL_PREFIX)}
    try:
        canonical, _ = open_clip_to_canonical(visual)
    except CheckpointError as exc:
        raise CheckpointError(_relabel(str(exc), label)) from exc
    out: dict[str, Tensor] = {}
    for name, tensor in canonical.items():
        key = name if name == "visual_projection.weight" else _HF_VISION_PREFIX + name
        out[key] = tensor.clone()  # q/k/v come back as views of in_proj
    for key, tensor in state.items():
        if key.startswith(_VISUAL_PREFIX):
            continue
        for _, hf_name, op, open_clip_re, _ in _TEXT_COMPILED:
            if m := open_clip_re.fullmatch(key):
                fields = m.groupdict()
                if op == "qkv":
                    for which, part in zip(QKV, tensor.chunk(3, dim=0), strict=True):
                        out[hf_name.format(qkv=which, **fields)] = part.clone()
                elif op == "transpose":
                    out[hf_name.format(**fields)] = tensor.t().contiguous()
                else:
                    out[hf_name.format(**fields)] = tensor.clone()
                break
        else:
            raise CheckpointError(
                f"{label}: tensor '{key}' has no counterpart in a Hugging Face CLIPModel; only "
                f"plain open_clip CLIP ViT models can be converted"
            )
    return out


def _relabel(message: str, label: str) -> str:
    return message.replace("<state dict>", label, 1)


# --------------------------------------------------------------------------------------------
# Configs: open_clip model cfg validation and HF CLIPConfig <-> open_clip cfg.
# --------------------------------------------------------------------------------------------

# Options a plain CLIP ViT may set; every other CLIPVisionCfg / CLIPTextCfg field must keep its
# default (anything else changes the key layout or the forward pass we reproduce).
_VISION_FREE = {
    "image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size",
    "patch_dropout",  # training only
    "final_ln_after_pool",  # same result for class-token pooling
    "act_kwargs", "norm_kwargs",
}  # fmt: skip
_TEXT_FREE = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
    "tokenizer_kwargs",  # passed to open_clip's SimpleTokenizer
    "pad_id", "eos_id",  # unused by argmax pooling
    "final_ln_after_pool",  # same result for single-token pooling
    "act_kwargs", "norm_kwargs",
}  # fmt: skip
_TOP_LEVEL = {
    "embed_dim",
    "vision_cfg",
    "text_cfg",
    "quick_gelu",
    "custom_text",
    "init_logit_scale",
}
_VISION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)}
_TEXT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CLIPTextCfg)}
_VISION_SHAPE = ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size")
_TEXT_SHAPE = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")
_SUPPORTED = "only plain CLIP ViT models (ViT image tower, CLIP text transformer) are supported"


def _check_model_cfg(cfg: Any, label: str) -> dict[str, Any]:
    """Validate an open_clip model cfg for a plain CLIP ViT; return a normalised copy.

    The copy always spells out the shape fields (image_size, layers, width, head_width,
    mlp_ratio, patch_size; context_length, vocab_size, width, heads, layers, mlp_ratio) and
    `quick_gelu`, so two cfgs describing the same model compare equal.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{label}: model config must be a JSON object, not {type(cfg).__name__}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ConfigError(f"{label}: model config has no '{key}'; {_SUPPORTED}")
    if cfg.get("custom_text"):
        raise ConfigError(f"{label}: 'custom_text' (CustomTextCLIP) is not supported; {_SUPPORTED}")
    if unknown := sorted(set(cfg) - _TOP_LEVEL):
        raise ConfigError(
            f"{label}: model config option '{unknown[0]}' is not supported; {_SUPPORTED}"
        )
    if not _positive_int(cfg["embed_dim"]):
        raise ConfigError(
            f"{label}: 'embed_dim' must be a positive integer, not {cfg['embed_dim']!r}"
        )
    quick_gelu = cfg.get("quick_gelu", False)
    if not isinstance(quick_gelu, bool):
        raise ConfigError(f"{label}: 'quick_gelu' must be true or false, not {quick_gelu!r}")
    out: dict[str, Any] = {"embed_dim": cfg["embed_dim"], "quick_gelu": quick_gelu}
    for section, defaults, free, shape in (
        ("vision_cfg", _VISION_DEFAULTS, _VISION_FREE, _VISION_SHAPE),
        ("text_cfg", _TEXT_DEFAULTS, _TEXT_FREE, _TEXT_SHAPE),
    ):
        sub = cfg[section]
        if not isinstance(sub, Mapping):
            raise ConfigError(
                f"{label}: '{section}' must be a JSON object, not {type(sub).__name__}"
            )
        for key, value in sub.items():
            if key not in defaults:
                raise ConfigError(f"{label}: unknown option '{section}.{key}'")
            if key not in free and value != defaults[key]:
                raise ConfigError(
                    f"{label}: option '{section}.{key}' = {value!r} is not supported; {_SUPPORTED}"
                )
        normal = {k: defaults[k] for k in shape}
        normal.update((k, v) for k, v in sub.items() if k in free and v != defaults[k])
        for key in shape:
            value = normal[key]
            if key == "image_size" and isinstance(value, (list, tuple)) and len(set(value)) == 1:
                value = normal[key] = value[0]  # [224, 224] -> 224
            if key == "mlp_ratio":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                normal[key] = float(value) if ok else value
            else:
                ok = _positive_int(value)
            if not ok:
                what = "a list (a ResNet image tower)" if key == "layers" else repr(value)
                raise ConfigError(
                    f"{label}: '{section}.{key}' must be a positive number, not {what}; "
                    f"{_SUPPORTED}"
                )
        out[section] = normal
    vision, text = out["vision_cfg"], out["text_cfg"]
    if vision["width"] % vision["head_width"]:
        raise ConfigError(
            f"{label}: 'vision_cfg.width' {vision['width']} is not a multiple of "
            f"'head_width' {vision['head_width']}"
        )
    if text["width"] % text["heads"]:
        raise ConfigError(
            f"{label}: 'text_cfg.width' {text['width']} is not a multiple of "
            f"'heads' {text['heads']}"
        )
    if text["vocab_size"] < CLIP_VOCAB_SIZE:
        raise ConfigError(
            f"{label}: 'text_cfg.vocab_size' {text['vocab_size']} is smaller than CLIP's BPE "
            f"vocabulary ({CLIP_VOCAB_SIZE}) that open_clip's tokenizer emits"
        )
    return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _image_size(model_cfg: Mapping[str, Any]) -> int:
    return int(model_cfg["vision_cfg"]["image_size"])  # normalised by _check_model_cfg


# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit keys.
_HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "eos_token_id": CLIP_EOT_ID,
}  # fmt: skip
_HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
# HF hidden_act -> (open_clip quick_gelu flag, act_kwargs for nn.GELU)
_HF_ACTIVATIONS: dict[str, tuple[bool, dict[str, str] | None]] = {
    "quick_gelu": (True, None),
    "gelu": (False, None),
    "gelu_new": (False, {"approximate": "tanh"}),
    "gelu_pytorch_tanh": (False, {"approximate": "tanh"}),
}
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which open_clip's LayerNorm keeps


def open_clip_cfg_from_hf_config(
    config: Mapping[str, Any], *, label: str = "<config>"
) -> dict[str, Any]:
    """An open_clip model cfg for the CLIP described by an HF `CLIPConfig` dict (config.json)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{label}: config must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type == "clip_vision_model":
        raise ConfigError(
            f"{label}: describes a CLIPVisionModel (image tower only); a full CLIPModel with its "
            f"text tower is needed to build zero-shot classifiers"
        )
    if model_type not in (None, "clip"):
        raise ConfigError(f"{label}: model_type '{model_type}' is not a CLIP model ('clip')")
    towers = {}
    for name, defaults in (("text", _HF_TEXT_DEFAULTS), ("vision", _HF_VISION_DEFAULTS)):
        sub = config.get(f"{name}_config") or config.get(f"{name}_config_dict") or {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"{label}: '{name}_config' must be a JSON object")
        towers[name] = {**defaults, **{k: v for k, v in sub.items() if v is not None}}
    text, vision = towers["text"], towers["vision"]
    for name, tower in towers.items():
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not _positive_int(tower[key]):
                raise ConfigError(
                    f"{label}: '{name}_config.{key}' must be a positive integer, got {tower[key]!r}"
                )
        if tower["hidden_size"] % tower["num_attention_heads"]:
            raise ConfigError(
                f"{label}: '{name}_config.hidden_size' {tower['hidden_size']} is not a multiple of "
                f"num_attention_heads {tower['num_attention_heads']}"
            )
        if tower["hidden_act"] not in _HF_ACTIVATIONS:
            raise ConfigError(
                f"{label}: '{name}_config.hidden_act' '{tower['hidden_act']}' is not supported "
                f"(supported: {', '.join(_HF_ACTIVATIONS)})"
            )
    quick_text, act_text = _HF_ACTIVATIONS[text["hidden_act"]]
    quick_vision, act_vision = _HF_ACTIVATIONS[vision["hidden_act"]]
    if quick_text != quick_vision:
        raise ConfigError(
            f"{label}: text hidden_act '{text['hidden_act']}' and vision hidden_act "
            f"'{vision['hidden_act']}' differ in QuickGELU, which open_clip sets for both towers"
        )
    if vision["num_channels"] != 3:
        raise ConfigError(
            f"{label}: vision num_channels must be 3 (RGB), got {vision['num_channels']}"
        )
    eos = text.get("eos_token_id")
    if eos not in (None, 2, CLIP_EOT_ID):
        raise ConfigError(
            f"{label}: text eos_token_id {eos} is not CLIP's end-of-text token ({CLIP_EOT_ID}); "
            f"open_clip's tokenizer and argmax pooling only fit CLIP's BPE vocabulary"
        )

    def tower_cfg(tower: dict[str, Any], act: dict[str, str] | None, name: str) -> dict[str, Any]:
        width = tower["hidden_size"]
        ratio = tower["intermediate_size"] / width
        if int(width * ratio) != tower["intermediate_size"]:
            raise ConfigError(
                f"{label}: '{name}_config.intermediate_size' {tower['intermediate_size']} is not "
                f"representable as open_clip's width x mlp_ratio"
            )
        cfg: dict[str, Any] = {
            "width": width,
            "layers": tower["num_hidden_layers"],
            "mlp_ratio": ratio,
        }
        if act:
            cfg["act_kwargs"] = dict(act)
        if tower["layer_norm_eps"] != _LN_EPS:
            cfg["norm_kwargs"] = {"eps": float(tower["layer_norm_eps"])}
        return cfg

    vision_cfg = {
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "head_width": vision["hidden_size"] // vision["num_attention_heads"],
        **tower_cfg(vision, act_vision, "vision"),
    }
    text_cfg = {
        "context_length": text["max_position_embeddings"],
        "vocab_size": text["vocab_size"],
        "heads": text["num_attention_heads"],
        **tower_cfg(text, act_text, "text"),
    }
    cfg = {
        "embed_dim": config.get("projection_dim", 512),
        "quick_gelu": quick_text,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    return _check_model_cfg(cfg, label)


def hf_config_from_open_clip_cfg(
    cfg: Mapping[str, Any], *, label: str = "<config>"
) -> dict[str, Any]:
    """The HF `CLIPConfig` dict (config.json) of a plain open_clip CLIP ViT model cfg."""
    cfg = _check_model_cfg(cfg, label)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]

    def common(tower: Mapping[str, Any], heads: int) -> dict[str, Any]:
        if cfg["quick_gelu"]:
            act = "quick_gelu"
        else:
            approximate = (tower.get("act_kwargs") or {}).get("approximate", "none")
            act = "gelu_pytorch_tanh" if approximate == "tanh" else "gelu"
        return {
            "hidden_act": act,
            "hidden_size": tower["width"],
            "intermediate_size": int(tower["width"] * tower["mlp_ratio"]),
            "num_attention_heads": heads,
            "num_hidden_layers": tower["layers"],
            "layer_norm_eps": (tower.get("norm_kwargs") or {}).get("eps", _LN_EPS),
            "attention_dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "projection_dim": cfg["embed_dim"],
        }

    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg["embed_dim"],
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            **common(text, text["heads"]),
            "max_position_embeddings": text["context_length"],
            "vocab_size": text["vocab_size"],
            "bos_token_id": 49406,
            "eos_token_id": CLIP_EOT_ID,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **common(vision, vision["width"] // vision["head_width"]),
            "image_size": _image_size(cfg),
            "patch_size": vision["patch_size"],
            "num_channels": 3,
        },
    }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedClip:
    """A full CLIP model ready for zero-shot evaluation, whatever format it came in."""

    model: CLIP  # eval mode, float32
    model_cfg: dict[str, Any]  # open_clip model cfg it was built from (see new_visual_tower)
    arch: str  # architecture name, config JSON path, or "hf:<folder>"
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_path: Path
    tokenizer: Any  # open_clip tokenizer: tokenizer(list_of_texts) -> LongTensor [n, context]
    label: str = ""
    _text_sha256: str | None = field(default=None, init=False, repr=False, compare=False)

    def text_sha256(self) -> str:
        """SHA-256 of the text tower's weights (names, dtypes, shapes, values; sorted by name).

        A cache key for zero-shot heads: two models with the same text tower and tokenizer give
        the same class embeddings. Computed on first call, then cached.
        """
        if self._text_sha256 is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                if not _is_text_tensor(name):
                    continue
                tensor = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._text_sha256 = digest.hexdigest()
        return self._text_sha256

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing cfg attached to the model (size, mean, std, interpolation,
        resize_mode, ...): `PreprocessCfg(**clip.preprocess_cfg)` rebuilds it."""
        return dict(open_clip.get_model_preprocess_cfg(self.model))

    def preprocess_key(self) -> dict[str, Any]:
        """The preprocessing cfg as plain JSON values, a cache key for preprocessed images."""
        return json.loads(json.dumps(self.preprocess_cfg, sort_keys=True))


_BUILD_ERRORS = (TypeError, ValueError, AssertionError, RuntimeError)
_TEXT_ROOTS = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)


def _is_text_tensor(name: str) -> bool:
    return name.startswith(_TEXT_ROOTS)


def new_visual_tower(model_cfg: Mapping[str, Any]) -> nn.Module:
    """A fresh (randomly initialised, eval-mode, float32) open_clip VisionTransformer for a cfg.

    Built by open_clip's own `_build_vision_tower`, so its state_dict keys are exactly those of
    `CLIP(**model_cfg).visual`: load merged weights with `canonical_to_open_clip(...)`.
    """
    cfg = _check_model_cfg(model_cfg, "<model cfg>")
    try:
        tower = _build_vision_tower(cfg["embed_dim"], dict(cfg["vision_cfg"]), cfg["quick_gelu"])
    except _BUILD_ERRORS as exc:
        raise ConfigError(
            f"<model cfg>: cannot build this vision tower ({_first_line(exc)})"
        ) from exc
    return tower.float().eval()


def eval_geometry(clip: LoadedClip) -> Callable[[Any], Any]:
    """The PIL -> PIL part of open_clip's eval transform for `clip` (resize, centre crop, RGB).

    What remains of `open_clip.transform.image_transform_v2(..., is_train=False)` is ToTensor
    (uint8 -> [0, 1]) and Normalize(clip.mean, clip.std), so images can be cached as uint8 after
    this step. Picklable, for DataLoader workers.
    """
    full = image_transform_v2(PreprocessCfg(**clip.preprocess_cfg), is_train=False)
    steps = []
    for step in full.transforms:
        if isinstance(step, ToTensor):
            break
        steps.append(step)
    return Compose(steps)


def check_architecture(arch: str) -> dict[str, Any]:
    """Validate an open_clip architecture name or model-config JSON path without loading weights.

    Returns the normalised model cfg; raises ConfigError (one line) like load_clip would.
    """
    cfg, _, _ = _resolve_arch(str(arch))
    return cfg


def load_clip(
    *,
    open_clip: str | None = None,  # noqa: A002 - the user-facing option name
    weights: str | Path | None = None,
    hf: str | Path | None = None,
    label: str = "",
) -> LoadedClip:
    """Load a full CLIP as an open_clip `CLIP` (eval, float32), without any download.

    Pass either `open_clip` (an architecture name or a model-config JSON path) with `weights`
    (a full CLIP state dict: .safetensors / .pt / .pth / .bin, or a folder holding one), or `hf`
    (a Hugging Face CLIPModel folder). `label` (e.g. "suite.toml [model]") prefixes error
    messages. Raises ConfigError / CheckpointError with one line naming the bad file.
    """
    try:
        if hf is not None:
            if open_clip is not None or weights is not None:
                raise ConfigError(
                    "give either an open_clip architecture with weights, or an HF folder, not both"
                )
            return _load_hf(Path(hf), label)
        if open_clip is None or weights is None:
            raise ConfigError(
                "give an open_clip architecture (name or config .json) together with a weights "
                "file, or a Hugging Face CLIPModel folder"
            )
        return _load_open_clip(str(open_clip), Path(weights), label)
    except (ConfigError, CheckpointError) as exc:
        if not label:
            raise
        raise type(exc)(f"{label}: {exc}") from exc


def _load_open_clip(arch: str, weights: Path, label: str) -> LoadedClip:
    cfg, preprocess, tokenizer_factory = _resolve_arch(arch)
    model = _build_clip(cfg, arch)
    weights_file, state = _read_state_dict(weights)
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        state = hf_clip_to_open_clip(state, label=str(weights_file))  # an HF CLIPModel file
    _load_state(model, state, weights_file, arch)
    return _finish(model, cfg, arch, preprocess, weights_file, tokenizer_factory(), label)


_HF_FOLDER = "pass a Hugging Face CLIPModel folder (config.json + model.safetensors)"


def _load_hf(folder: Path, label: str) -> LoadedClip:
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder; {_HF_FOLDER}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{folder}: has no config.json; {_HF_FOLDER}")
    config = _read_json(config_file)
    cfg = open_clip_cfg_from_hf_config(config, label=str(config_file))
    arch = f"hf:{folder}"
    model = _build_clip(cfg, str(config_file))
    weights_file, state = _read_state_dict(folder)
    state = hf_clip_to_open_clip(state, label=str(weights_file))
    _load_state(model, state, weights_file, arch)
    preprocess = {}
    if (pp := folder / "preprocessor_config.json").is_file():
        pp_json = _read_json(pp)
        if isinstance(pp_json, Mapping):
            preprocess = {
                "mean": pp_json.get("image_mean"),
                "std": pp_json.get("image_std"),
            }
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return _finish(model, cfg, arch, preprocess, weights_file, tokenizer, label)


def _resolve_arch(arch: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(model cfg, preprocess overrides, tokenizer factory) for a name or config JSON path."""
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(
            f"{arch}: open_clip schema names are not supported (nothing is downloaded); pass a "
            f"built-in architecture name or a model config .json with a local weights file"
        )
    name = arch.replace("/", "-")  # open_clip's own normalisation ("ViT-B/32")
    raw = None if arch.endswith(".json") else open_clip.get_model_config(name)
    if raw is not None:  # a built-in name (wins over a same-named file in the working dir)
        cfg = _check_model_cfg(raw, f"open_clip architecture '{name}'")
        return cfg, {}, lambda: open_clip.get_tokenizer(name)
    path = Path(arch)
    if path.is_file():
        raw = _read_json(path)
        preprocess: dict[str, Any] = {}
        if isinstance(raw, Mapping) and "model_cfg" in raw:  # the hub's open_clip_config.json
            preprocess = dict(raw.get("preprocess_cfg") or {})
            raw = raw["model_cfg"]
        cfg = _check_model_cfg(raw, str(path))
        text = cfg["text_cfg"]
        context = text["context_length"]
        kwargs = dict(text.get("tokenizer_kwargs") or {})
        return cfg, preprocess, lambda: SimpleTokenizer(context_length=context, **kwargs)
    if arch.endswith(".json"):
        raise ConfigError(f"{arch}: no such model config file")
    raise ConfigError(f"unknown open_clip architecture '{arch}'; {_known_names_hint(name)}")


def _known_names_hint(name: str) -> str:
    names = open_clip.list_models()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    common = [n for n in ("ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14") if n in names]
    shown = list(dict.fromkeys(close + common))
    lead = f"did you mean {', '.join(close)}? " if close else ""
    return (
        f"{lead}known names include {', '.join(shown)} ({len(names)} in open_clip; "
        f"open_clip.list_models() lists them), or pass a model config .json"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({_first_line(exc)})") from exc


def _build_clip(cfg: Mapping[str, Any], label: str) -> CLIP:
    try:
        model = CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=dict(cfg["vision_cfg"]),
            text_cfg=dict(cfg["text_cfg"]),
            quick_gelu=cfg["quick_gelu"],
        )
    except _BUILD_ERRORS as exc:  # e.g. act_kwargs that QuickGELU does not take
        raise ConfigError(f"{label}: cannot build this CLIP model ({_first_line(exc)})") from exc
    return model.float().eval()


def _read_state_dict(path: Path) -> tuple[Path, dict[str, Tensor]]:
    """All tensors of a weights file / folder / sharded index, read with the safe readers."""
    kind, files, _ = _locate(path)
    shown = files[0] if len(files) == 1 else path
    state: dict[str, Tensor] = {}
    for file in files:
        if kind == "safetensors":
            handle = _safe_open(file)
            try:
                part = {key: handle.get_tensor(key) for key in handle.keys()}
            except Exception as exc:  # SafetensorError on a damaged data section
                raise CheckpointError(
                    f"{file}: truncated or corrupt safetensors file ({_first_line(exc)}); "
                    f"re-download or re-export it"
                ) from exc
        else:
            obj = _torch_load(file)
            if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                obj = obj["state_dict"]  # training checkpoints wrap the weights
            if not isinstance(obj, Mapping):
                raise CheckpointError(
                    f"{file}: holds a {type(obj).__name__}, not a state dict; save "
                    f"model.state_dict() instead"
                )
            part = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        for key, tensor in part.items():
            if key in state:
                raise CheckpointError(f"{file}: tensor '{key}' is also in another shard")
            state[key] = tensor
    if not state:
        raise CheckpointError(f"{shown}: contains no tensors")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return Path(shown), state


def _load_state(model: CLIP, state: dict[str, Tensor], file: Path, arch: str) -> None:
    """Strict load with one-line, file-naming errors for missing, extra and misshapen tensors."""
    state = {k: v for k, v in state.items() if k != "attn_mask"}  # non-persistent buffer
    expected = model.state_dict()
    # Shapes first: weights for another architecture often also lack or add tensors (other
    # depth), but a shape mismatch says most clearly what is wrong.
    for key, target in expected.items():
        if key not in state:
            continue
        if tuple(state[key].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{file}: tensor '{key}' has shape {tuple(state[key].shape)} but architecture "
                f"{arch} expects {tuple(target.shape)}; the weights are for a different "
                f"architecture"
            )
        if not (state[key].is_floating_point() or state[key].dtype == target.dtype):
            raise CheckpointError(f"{file}: tensor '{key}' has non-float dtype {state[key].dtype}")
    if missing := [k for k in expected if k not in state]:
        if all(_is_text_tensor(k) or k == "logit_scale" for k in missing):
            raise CheckpointError(
                f"{file}: has no text tower (missing '{missing[0]}'); a full CLIP checkpoint "
                f"(image and text towers) is needed to build zero-shot classifiers"
            )
        raise CheckpointError(
            f"{file}: tensor '{missing[0]}' is missing ({len(missing)} missing in all); "
            f"these weights are not a full {arch} CLIP model"
        )
    if extra := sorted(k for k in state if k not in expected):
        raise CheckpointError(
            f"{file}: has tensor '{extra[0]}' that architecture {arch} does not have "
            f"({len(extra)} in all); the weights are for a different architecture"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # should not happen after the checks above
        raise CheckpointError(f"{file}: cannot be loaded into {arch} ({_first_line(exc)})") from exc


def _channels(value: Any, what: str, arch: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or (what == "std" and min(out) <= 0):
        raise ConfigError(f"{arch}: image {what} must be 3 numbers (R, G, B), got {value!r}")
    return out


def _finish(
    model: CLIP,
    cfg: dict[str, Any],
    arch: str,
    preprocess: Mapping[str, Any],
    weights_file: Path,
    tokenizer: Any,
    label: str,
) -> LoadedClip:
    image_size = _image_size(cfg)
    mean = _channels(preprocess.get("mean") or OPENAI_MEAN, "mean", arch)
    std = _channels(preprocess.get("std") or OPENAI_STD, "std", arch)
    # What open_clip.create_model would attach, so that open_clip.transform.image_transform_v2(
    # PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False) builds the
    # eval transform (resize shortest side, centre crop, bicubic, normalise).
    pp = dataclasses.asdict(PreprocessCfg())
    pp.update((k, v) for k, v in preprocess.items() if k in pp and v is not None)
    pp.update(size=image_size, mean=mean, std=std)
    open_clip.set_model_preprocess_cfg(model, pp)
    return LoadedClip(
        model=model,
        model_cfg=cfg,
        arch=arch,
        image_size=image_size,
        mean=mean,
        std=std,
        weights_path=weights_file,
        tokenizer=tokenizer,
        label=label,
    )
