"""Model configuration: one frozen, hashable dataclass, read from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("llama", "qwen2", "mixtral")
DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
  """Llama 3.1 ("llama3") frequency scaling."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  tie_embeddings: bool = False
  num_experts: int = 0            # 0: dense MLP; > 0: Mixtral-style MoE
  experts_per_token: int = 2
  dtype: str = "bfloat16"         # parameter and activation dtype
  # Copies of each checkpoint KV head in ``num_kv_heads`` (``for_tp``): 1, or TP / KV when the
  # TP size exceeds the checkpoint's KV heads, so that every rank holds one whole KV head.
  kv_replicas: int = 1

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig: unknown family {self.family!r}; expected one of {FAMILIES}")
    for name in _INT_FIELDS:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"ModelConfig: {name} must be an int, got {value!r}")
    for name in ("rms_norm_eps", "rope_theta"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"ModelConfig: {name} must be a positive number, got {value!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "kv_replicas"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig: {name} must be positive, got {getattr(self, name)}")
    if self.num_experts < 0:
      raise ValueError(f"ModelConfig: num_experts must be >= 0, got {self.num_experts}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.num_kv_heads % self.kv_replicas:
      raise ValueError(f"ModelConfig: num_kv_heads={self.num_kv_heads} is not a multiple of "
                       f"kv_replicas={self.kv_replicas}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig: head_dim={self.head_dim} must be even for RoPE")
    if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
      raise ValueError(f"ModelConfig: experts_per_token={self.experts_per_token} must be in "
                       f"[1, num_experts={self.num_experts}]")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig: dtype {self.dtype!r} not one of bfloat16/float16/float32")

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def q_per_kv(self) -> int:
    """Query heads per (possibly replicated) KV head: G in the weight layouts."""
    return self.num_heads // self.num_kv_heads

  @property
  def checkpoint_kv_heads(self) -> int:
    """The KV heads of the checkpoint, before replication."""
    return self.num_kv_heads // self.kv_replicas

  def replace(self, **kw) -> "ModelConfig":
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise TypeError(f"ModelConfig.replace: unknown field(s) {unknown}")
    return dataclasses.replace(self, **kw)

  def for_tp(self, tp: int) -> "ModelConfig":
    """This model laid out for TP size ``tp``: KV heads replicated ``tp / KV`` times when ``tp``
    exceeds the checkpoint's KV heads (as vLLM does), else unreplicated.

    Replication is exact: replica s of KV head j serves query heads [s*G/r, (s+1)*G/r) of group
    j, so the model computes the same function at every TP (``weave_jax.init.replicate_kv``).
    Raises a ValueError naming ``tp`` and the dimension it does not fit.
    """
    _check_tp_size(tp)
    kv = self.checkpoint_kv_heads
    if self.num_heads % tp:
      raise ValueError(f"TP size {tp} does not divide num_heads={self.num_heads}")
    if tp > kv and tp % kv:
      raise ValueError(f"TP size {tp} is larger than num_kv_heads={kv} but not a multiple of "
                       "it, so the KV heads cannot be replicated evenly")
    replicas = tp // kv if tp > kv else 1
    out = self.replace(num_kv_heads=kv * replicas, kv_replicas=replicas)
    out.check_tp(tp)
    return out

  def check_tp(self, tp: int) -> None:
    """Raise a ValueError naming the dimension that ``tp`` does not divide."""
    _check_tp_size(tp)
    dims = {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads}
    if self.is_moe:
      dims["num_experts"] = self.num_experts
    else:
      dims["intermediate_size (FFN)"] = self.intermediate_size
    for name, value in dims.items():
      if value % tp:
        hint = ""
        if name == "num_kv_heads" and tp % value == 0 and self.num_heads % tp == 0:
          hint = (f" (build the model with cfg.for_tp({tp}) to replicate its KV heads; "
                  "init_random and load_hf_checkpoint do)")
        raise ValueError(f"TP size {tp} does not divide {name}={value}{hint}")

  def params_per_layer(self) -> int:
    """Parameters of one layer as in the checkpoint (KV replicas not counted)."""
    h, d = self.hidden_size, self.head_dim
    attn = h * d * (self.num_heads * 2 + self.checkpoint_kv_heads * 2)
    ffn = 3 * h * self.intermediate_size * max(self.num_experts, 1)
    return attn + ffn + (h * self.num_experts if self.is_moe else 0) + 2 * h


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "num_experts", "experts_per_token", "kv_replicas")


def _check_tp_size(tp) -> None:
  if not isinstance(tp, int) or isinstance(tp, bool) or tp not in (1, 2, 4, 8):
    raise ValueError(f"tensor-parallel size must be 1, 2, 4 or 8, got {tp!r}")


# --- Hugging Face config.json -------------------------------------------------------------

_HF_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size")
_HF_FAMILY = {"llama": "llama", "qwen2": "qwen2", "mixtral": "mixtral"}


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  # transformers >= 5 writes "rope_parameters"; older files write rope_theta + rope_scaling.
  params = cfg.get("rope_parameters") or {}
  scaling = cfg.get("rope_scaling") or params
  for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
    if not isinstance(value, dict):
      raise ValueError(f"config.json: {key} must be an object, got {value!r}")
  theta = _hf_float(params, "rope_theta", _hf_float(cfg, "rope_theta", 10000.0))
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind in ("default", None):
    return theta, None
  if kind != "llama3":
    raise ValueError(f"config.json: rope scaling type {kind!r} is not supported "
                     "(supported: default, llama3)")
  try:
    return theta, RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]),
                              int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise ValueError(f"config.json: llama3 rope scaling is missing key {e.args[0]!r}") from None


def _hf_unsupported(cfg: dict[str, Any], family: str) -> None:
  """Keys whose values would change the math in ways this library does not implement."""
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act={cfg['hidden_act']!r} is not supported (silu only)")
  if cfg.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=true is not supported")
  if family == "llama" and cfg.get("attention_bias"):
    raise ValueError("config.json: attention_bias=true is not supported for llama")
  if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
    raise ValueError("config.json: sliding-window attention is not supported")


def _read_hf_config(source) -> dict[str, Any]:
  """``source`` (a dict, a config.json path or its directory) as a dict."""
  if isinstance(source, dict):
    return source
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"from_hf_config: source must be a dict, a path or a directory, got "
                    f"{type(source).__name__}")
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"from_hf_config: no config file at {path}")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"from_hf_config: {path} is not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise TypeError(f"from_hf_config: {path} holds a JSON {type(cfg).__name__}, expected an "
                    "object")
  return cfg


def _hf_int(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
  """``cfg[key]`` as an int; a non-integral value (e.g. 64.5, "64", true) is a ValueError."""
  value = cfg.get(key)
  if value is None:
    if default is None:
      raise ValueError(f"config.json: missing required key {key!r}")
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
    raise ValueError(f"config.json: {key} must be an integer, got {value!r}")
  return int(value)


def _hf_float(cfg: dict[str, Any], key: str, default: float) -> float:
  value = cfg.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"config.json: {key} must be a number, got {value!r}")
  return float(value)


def from_hf_config(source: str | os.PathLike | dict[str, Any], dtype: str = "bfloat16") -> ModelConfig:
  """Build a ModelConfig from a Hugging Face ``config.json`` (a path, a directory, or a dict).

  The result is not yet laid out for a TP size: ``load_hf_checkpoint`` and ``init_random``
  apply ``ModelConfig.for_tp``.
  """
  if not isinstance(dtype, str) or dtype not in DTYPES:
    raise ValueError(f"from_hf_config: dtype must be one of {DTYPES}, got {dtype!r}")
  cfg = _read_hf_config(source)
  model_type = cfg.get("model_type")
  if model_type not in _HF_FAMILY:
    raise ValueError(f"config.json: unknown or missing model_type {model_type!r}; "
                     f"supported: {sorted(_HF_FAMILY)}")
  missing = [k for k in _HF_REQUIRED if k not in cfg]
  if missing:
    raise ValueError(f"config.json: missing required key(s) {missing}")
  family = _HF_FAMILY[model_type]
  _hf_unsupported(cfg, family)
  theta, scaling = _hf_rope(cfg)
  heads, hidden = _hf_int(cfg, "num_attention_heads"), _hf_int(cfg, "hidden_size")
  if heads <= 0:
    raise ValueError(f"config.json: num_attention_heads must be positive, got {heads}")
  return ModelConfig(
      family=family,
      vocab_size=_hf_int(cfg, "vocab_size"),
      hidden_size=hidden,
      intermediate_size=_hf_int(cfg, "intermediate_size"),
      num_layers=_hf_int(cfg, "num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=_hf_int(cfg, "num_key_value_heads", heads),
      head_dim=_hf_int(cfg, "head_dim", hidden // heads),
      rms_norm_eps=_hf_float(cfg, "rms_norm_eps", 1e-6 if family == "qwen2" else 1e-5),
      rope_theta=theta,
      rope_scaling=scaling,
      qkv_bias=family == "qwen2",
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      num_experts=_hf_int(cfg, "num_local_experts", 0) if family == "mixtral" else 0,
      experts_per_token=_hf_int(cfg, "num_experts_per_tok", 2),
      dtype=dtype,
  )


# --- Presets ---------------------------------------------------------------------------------

_LLAMA31_ROPE = RopeScaling(8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelConfig] = {
    "llama-3.3-70b": ModelConfig("llama", 128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 500000.0,
                                 _LLAMA31_ROPE),
    "llama-3.1-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0,
                                _LLAMA31_ROPE),
    "qwen2.5-72b": ModelConfig("qwen2", 152064, 8192, 29568, 80, 64, 8, 128, 1e-6, 1000000.0,
                               qkv_bias=True),
    "mixtral-8x22b": ModelConfig("mixtral", 32768, 6144, 16384, 56, 48, 8, 128, 1e-5, 1000000.0,
                                 num_experts=8, experts_per_token=2),
    # Small enough for CPU tests at TP=8 (every sharded dimension divisible by 8).
    "tiny": ModelConfig("llama", 512, 256, 512, 2, 16, 8, 16, 1e-5, 10000.0, dtype="float32"),
}


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset, optionally with fields replaced (e.g. ``num_layers=4``)."""
  if not isinstance(name, str):
    raise TypeError(f"preset: name must be a str, got {type(name).__name__}")
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
