"""Checkpoint I/O: Hugging Face safetensors -> the TP-sharded model, and orbax save / restore.

``load_hf_checkpoint`` never holds the whole model on one device or in host memory: it builds
the abstract model, and every parameter becomes a global array through
``jax.make_array_from_callback``, whose callback reads only the rows / columns that one device
owns (``safe_open(...).get_slice``) and converts them from the Hugging Face layout to ours
(documented at the top of ``weave_jax.model``).  When the TP size exceeds the checkpoint's KV
heads, the model is laid out with them replicated (``ModelConfig.for_tp``) and each device
reads only the k/v head it holds.

Hugging Face names (transformers 5.x; older per-expert Mixtral files are read too):
  model.embed_tokens.weight (V, H)            lm_head.weight (V, H) (absent when tied)
  model.layers.{i}.self_attn.{q,k,v}_proj.weight (N*D | KV*D, H), .bias (Qwen2), o_proj (H, N*D)
  model.layers.{i}.mlp.{gate,up}_proj.weight (F, H), down_proj.weight (H, F)
  Mixtral router: model.layers.{i}.mlp.gate.weight | block_sparse_moe.gate.weight (E, H)
  Mixtral experts, fused: mlp.experts.gate_up_proj (E, 2F, H) [gate rows, then up],
                          mlp.experts.down_proj (E, H, F)
                per expert: block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) (F, H), w2 (H, F)
  model.layers.{i}.{input,post_attention}_layernorm.weight (H,), model.norm.weight (H,)
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from weave_jax.config import DTYPES, ModelConfig, from_hf_config
from weave_jax.init import abstract_model
from weave_jax.model import Transformer, padded_vocab
from weave_jax.comm.base import AXIS
from weave_jax.sharding import (check_mesh, logical_to_spec, relayout_kv_state, state_key,
                                state_shardings)

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"

Index = tuple[slice, ...]


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _span(s: slice, n: int) -> tuple[int, int]:
  start, stop, step = s.indices(n)
  if step != 1:
    raise ValueError(f"load_hf_checkpoint: strided shard index {s} is not supported")
  return start, stop


# --- reading safetensors ----------------------------------------------------------------------

class _Safetensors:
  """Tensor name -> file of a checkpoint directory (one file, or sharded with an index)."""

  force_bf16_map = False         # tests: always read BF16 through the memory map

  def __init__(self, directory: str, stack: contextlib.ExitStack):
    from safetensors import safe_open
    self.directory = directory
    index_path = os.path.join(directory, _INDEX_FILE)
    if os.path.exists(index_path):
      weight_map = _read_weight_map(index_path)
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, _SINGLE_FILE)):
      files, weight_map = [_SINGLE_FILE], None
    else:
      raise ValueError(f"load_hf_checkpoint: {directory} holds neither {_SINGLE_FILE} nor "
                       f"{_INDEX_FILE}")
    self.handles = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise ValueError(f"load_hf_checkpoint: {_INDEX_FILE} names {name}, which is missing "
                         f"from {directory}")
      try:
        self.handles[name] = stack.enter_context(safe_open(path, framework="np"))
      except Exception as e:       # safetensors raises its own SafetensorError on a bad header
        raise ValueError(f"load_hf_checkpoint: {path} is not a readable safetensors file "
                         f"({e})") from None
    if weight_map is None:
      weight_map = {k: _SINGLE_FILE for k in self.handles[_SINGLE_FILE].keys()}
    else:
      _check_index(weight_map, self.handles)
    self.file_of: dict[str, str] = weight_map
    self._np_bf16 = True           # until safetensors proves it cannot give numpy BF16
    self._headers: dict[str, tuple[int, dict]] = {}

  def has(self, name: str) -> bool:
    return name in self.file_of

  def _slice(self, name: str):
    if name not in self.file_of:
      raise ValueError(f"load_hf_checkpoint: tensor {name!r} is missing from the checkpoint "
                       f"in {self.directory}")
    return self.handles[self.file_of[name]].get_slice(name)

  def check(self, name: str, shape: Sequence[int]) -> None:
    """Raise a ValueError unless ``name`` exists with ``shape`` and a float dtype."""
    sl = self._slice(name)
    found, dtype = tuple(sl.get_shape()), sl.get_dtype()
    where = f"tensor {name!r} in {self.file_of[name]}"
    if found != tuple(shape):
      raise ValueError(f"load_hf_checkpoint: {where} has shape {found}, expected {tuple(shape)}")
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"load_hf_checkpoint: {where} has dtype {dtype}, which cannot be cast to "
                       f"a float parameter (expected one of {_FLOAT_DTYPES})")

  def read(self, name: str, *spans: tuple[int, int]) -> np.ndarray:
    """The block ``name[a0:b0, a1:b1, ...]`` (leading dims), read without the rest."""
    index = tuple(slice(a, b) for a, b in spans)
    sl = self._slice(name)
    if sl.get_dtype() == "BF16" and (self.force_bf16_map or not self._np_bf16):
      return np.asarray(self._bf16_view(name)[index])
    try:
      return np.asarray(sl[index])
    except TypeError:              # old safetensors: "data type 'bfloat16' not understood"
      if sl.get_dtype() != "BF16":
        raise
      self._np_bf16 = False
      return np.asarray(self._bf16_view(name)[index])

  def _bf16_view(self, name: str) -> np.ndarray:
    """A memory-mapped bfloat16 view of ``name``.  Older safetensors (0.5.x) cannot hand numpy a
    BF16 tensor ("data type 'bfloat16' not understood"); slicing the map reads only the pages
    it touches."""
    path = os.path.join(self.directory, self.file_of[name])
    if path not in self._headers:
      with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        self._headers[path] = (header_len, json.loads(f.read(header_len)))
    header_len, header = self._headers[path]
    info = header[name]
    start, stop = info["data_offsets"]
    raw = np.memmap(path, np.uint8, "r", offset=8 + header_len + start, shape=(stop - start,))
    return raw.view(jnp.bfloat16).reshape(info["shape"])


def _read_weight_map(index_path: str) -> dict[str, str]:
  """The index's tensor name -> file name map, checked to be one."""
  with open(index_path) as f:
    try:
      index = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"load_hf_checkpoint: {index_path} is not valid JSON ({e})") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise ValueError(f"load_hf_checkpoint: {index_path} has no 'weight_map'")
  bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
  if bad:
    raise ValueError(f"load_hf_checkpoint: {index_path} maps tensor {bad[0][0]!r} to "
                     f"{bad[0][1]!r}, not a file name")
  return weight_map


def _check_index(weight_map: dict, handles: dict) -> None:
  """Every tensor the index names is in the file it names it in."""
  held = {name: set(handle.keys()) for name, handle in handles.items()}
  for tensor, file in weight_map.items():
    if tensor not in held[file]:
      raise ValueError(f"load_hf_checkpoint: {_INDEX_FILE} puts tensor {tensor!r} in {file}, "
                       "which does not hold it")


# --- HF layout -> our layout, one block at a time -----------------------------------------------
# A source is (checks, block): ``checks`` lists (hf name, hf shape) to validate up front;
# ``block(index)`` returns our parameter's block at ``index`` (a tuple of slices).

Source = tuple[list[tuple[str, tuple[int, ...]]], Callable[[Index], np.ndarray]]


def _direct(st: _Safetensors, name: str, shape) -> Source:
  def block(idx):
    return st.read(name, *(_span(s, n) for s, n in zip(idx, shape)))
  return [(name, tuple(shape))], block


def _padded_rows(st: _Safetensors, name: str, vocab: int, v_pad: int, h: int) -> Source:
  """(V, H) table -> (V_pad, H) with zero rows beyond the vocabulary."""
  def block(idx):
    (v0, v1), hs = _span(idx[0], v_pad), _span(idx[1], h)
    out = np.zeros((v1 - v0, hs[1] - hs[0]), np.float32)
    if v0 < vocab:
      rows = st.read(name, (v0, min(v1, vocab)), hs)
      out = out.astype(rows.dtype)
      out[:rows.shape[0]] = rows
    return out
  return [(name, (vocab, h))], block


def _attention(st: _Safetensors, cfg: ModelConfig, p: str):
  """Sources for qkv (H, KV, G+2, D), qkv_bias (KV, G+2, D) and o (KV, G, D, H).

  KV and G are those of ``cfg`` (after ``for_tp``): with r = ``cfg.kv_replicas`` copies of each
  checkpoint KV head, our KV head j holds the checkpoint's k/v head j // r and G = N / KV query
  heads, so query heads stay contiguous rows of q_proj and only k/v rows repeat.
  """
  h, kv, g, d, n = (cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim,
                    cfg.num_heads)
  r, kv_ckpt = cfg.kv_replicas, cfg.checkpoint_kv_heads
  q, k, v, o = (f"{p}.self_attn.{x}_proj" for x in "qkvo")

  def kv_rows(name, k0, k1, *rest):
    """Our KV heads [k0, k1) of k/v tensor ``name``: (k1-k0, D, ...), each checkpoint head read
    once and repeated for its replicas."""
    j0, j1 = k0 // r, (k1 - 1) // r + 1
    w = st.read(name, (j0 * d, j1 * d), *rest)
    w = np.repeat(w.reshape(j1 - j0, d, *w.shape[1:]), r, axis=0)
    return w[k0 - j0 * r:k1 - j0 * r]

  def qkv_block(idx):
    hs, (k0, k1) = _span(idx[0], h), _span(idx[1], kv)
    nk = k1 - k0
    # q heads of our kv groups k0..k1 are the contiguous rows [k0*G*D, k1*G*D) of q_proj.
    wq = st.read(f"{q}.weight", (k0 * g * d, k1 * g * d), hs).reshape(nk, g, d, -1)
    wk = kv_rows(f"{k}.weight", k0, k1, hs)[:, None]
    wv = kv_rows(f"{v}.weight", k0, k1, hs)[:, None]
    blk = np.concatenate([wq, wk, wv], axis=1).transpose(3, 0, 1, 2)   # (Hs, nk, G+2, D)
    return blk[:, :, idx[2], idx[3]]

  def bias_block(idx):
    k0, k1 = _span(idx[0], kv)
    nk = k1 - k0
    bq = st.read(f"{q}.bias", (k0 * g * d, k1 * g * d)).reshape(nk, g, d)
    bk = kv_rows(f"{k}.bias", k0, k1)[:, None]
    bv = kv_rows(f"{v}.bias", k0, k1)[:, None]
    return np.concatenate([bq, bk, bv], axis=1)[:, idx[1], idx[2]]     # (nk, G+2, D)

  def o_block(idx):
    k0, k1 = _span(idx[0], kv)
    hs = _span(idx[3], h)
    w = st.read(f"{o}.weight", hs, (k0 * g * d, k1 * g * d))            # (Hs, nk*G*D)
    blk = w.reshape(w.shape[0], k1 - k0, g, d).transpose(1, 2, 3, 0)   # (nk, G, D, Hs)
    return blk[:, idx[1], idx[2], :]

  qkv_checks = [(f"{q}.weight", (n * d, h)), (f"{k}.weight", (kv_ckpt * d, h)),
                (f"{v}.weight", (kv_ckpt * d, h))]
  bias_checks = [(f"{q}.bias", (n * d,)), (f"{k}.bias", (kv_ckpt * d,)),
                 (f"{v}.bias", (kv_ckpt * d,))]
  return {"qkv": (qkv_checks, qkv_block), "qkv_bias": (bias_checks, bias_block),
          "o": ([(f"{o}.weight", (h, n * d))], o_block)}


def _dense_mlp(st: _Safetensors, cfg: ModelConfig, p: str):
  """Sources for gate_up (H, 2, F) and down (F, H)."""
  h, f = cfg.hidden_size, cfg.intermediate_size
  gate, up, down = (f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down"))

  def gate_up_block(idx):
    hs, fs = _span(idx[0], h), _span(idx[2], f)
    parts = [st.read(name, fs, hs).T for name in (gate, up)]            # 2 x (Hs, Fs)
    return np.stack(parts, axis=1)[:, idx[1], :]

  def down_block(idx):
    return st.read(down, _span(idx[1], h), _span(idx[0], f)).T         # (Fs, Hs)

  return {"gate_up": ([(gate, (f, h)), (up, (f, h))], gate_up_block),
          "down": ([(down, (h, f))], down_block)}


def _first_present(st: _Safetensors, names: Sequence[str]) -> str | None:
  return next((x for x in names if st.has(x)), None)


def _moe(st: _Safetensors, cfg: ModelConfig, p: str):
  """Sources for router (H, E), gate_up (E, H, 2, F), down (E, F, H); fused or per-expert files."""
  h, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
  router = (_first_present(st, [f"{p}.mlp.gate.weight", f"{p}.block_sparse_moe.gate.weight"])
            or f"{p}.mlp.gate.weight")
  out = {"router": ([(router, (e, h))],
                    lambda idx: st.read(router, _span(idx[1], e), _span(idx[0], h)).T)}
  fused = _first_present(st, [f"{p}.mlp.experts.gate_up_proj",
                              f"{p}.block_sparse_moe.experts.gate_up_proj"])
  if fused is not None:
    fused_down = fused.replace("gate_up_proj", "down_proj")

    def gate_up_block(idx):
      es, hs, (f0, f1) = _span(idx[0], e), _span(idx[1], h), _span(idx[3], f)
      parts = [st.read(fused, es, (c * f + f0, c * f + f1), hs).transpose(0, 2, 1)
               for c in (0, 1)]                                           # 2 x (Es, Hs, Fs)
      return np.stack(parts, axis=2)[:, :, idx[2], :]

    def down_block(idx):
      return st.read(fused_down, _span(idx[0], e), _span(idx[2], h),
                     _span(idx[1], f)).transpose(0, 2, 1)                 # (Es, Fs, Hs)

    out["gate_up"] = ([(fused, (e, 2 * f, h))], gate_up_block)
    out["down"] = ([(fused_down, (e, h, f))], down_block)
    return out

  base = (_first_present(st, [f"{p}.block_sparse_moe.experts.0.w1.weight",
                              f"{p}.mlp.experts.0.w1.weight"])
          or f"{p}.block_sparse_moe.experts.0.w1.weight").rsplit(".0.w1.weight", 1)[0]
  w = lambda i, x: f"{base}.{i}.{x}.weight"

  def gate_up_block_legacy(idx):
    (e0, e1), hs, fs = _span(idx[0], e), _span(idx[1], h), _span(idx[3], f)
    blocks = [np.stack([st.read(w(i, x), fs, hs).T for x in ("w1", "w3")], axis=1)
              for i in range(e0, e1)]                                     # Es x (Hs, 2, Fs)
    return np.stack(blocks)[:, :, idx[2], :]

  def down_block_legacy(idx):
    (e0, e1), fs, hs = _span(idx[0], e), _span(idx[1], f), _span(idx[2], h)
    return np.stack([st.read(w(i, "w2"), hs, fs).T for i in range(e0, e1)])

  out["gate_up"] = ([(w(i, x), (f, h)) for i in range(e) for x in ("w1", "w3")],
                    gate_up_block_legacy)
  out["down"] = ([(w(i, "w2"), (h, f)) for i in range(e)], down_block_legacy)
  return out


def _sources(st: _Safetensors, cfg: ModelConfig) -> dict[tuple, Source]:
  """Our parameter path -> its source, for every parameter of the model."""
  h, v, v_pad = cfg.hidden_size, cfg.vocab_size, padded_vocab(cfg)
  src: dict[tuple, Source] = {
      ("embed", "table"): _padded_rows(st, "model.embed_tokens.weight", v, v_pad, h),
      ("final_norm", "weight"): _direct(st, "model.norm.weight", (h,)),
  }
  if not cfg.tie_embeddings:
    src[("lm_head", "weight")] = _padded_rows(st, "lm_head.weight", v, v_pad, h)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}"
    src[("layers", i, "attn_norm", "weight")] = _direct(st, f"{p}.input_layernorm.weight", (h,))
    src[("layers", i, "mlp_norm", "weight")] = _direct(
        st, f"{p}.post_attention_layernorm.weight", (h,))
    for name, s in _attention(st, cfg, p).items():
      if name != "qkv_bias" or cfg.qkv_bias:
        src[("layers", i, "attn", name)] = s
    mlp = _moe(st, cfg, p) if cfg.is_moe else _dense_mlp(st, cfg, p)
    for name, s in mlp.items():
      src[("layers", i, "mlp", name)] = s
  return src


def load_hf_checkpoint(path: str | os.PathLike, mesh: Mesh,
                       dtype: str = "bfloat16") -> Transformer:
  """Load a Hugging Face Llama / Qwen2 / Mixtral checkpoint directory, already TP-sharded.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or sharded files with
      ``model.safetensors.index.json``).
    mesh: the 1-D ``tp`` mesh (``weave_jax.make_mesh``); each device reads only its shards
      (with KV heads replicated, each device reads its own KV head, ``ModelConfig.for_tp``).
    dtype: parameter dtype (bfloat16 / float16 / float32); checkpoint floats are cast to it.

  Every argument, the config and every tensor's name, shape and dtype are checked (ValueError /
  TypeError naming the bad one) before any tensor is read.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"load_hf_checkpoint: path must be a str or os.PathLike, got "
                    f"{type(path).__name__}")
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"load_hf_checkpoint: path {path} is not a directory")
  if not isinstance(dtype, str) or dtype not in DTYPES:
    raise ValueError(f"load_hf_checkpoint: dtype must be one of {DTYPES}, got {dtype!r}")
  tp = check_mesh(mesh, "load_hf_checkpoint")
  cfg = from_hf_config(path, dtype=dtype)
  try:
    cfg = cfg.for_tp(tp)
  except ValueError as e:
    raise ValueError(f"load_hf_checkpoint: {path} cannot run on this mesh: {e}") from None
  graphdef, abstract = nnx.split(abstract_model(cfg))
  np_dtype = jnp.dtype(dtype)
  with contextlib.ExitStack() as stack:
    st = _Safetensors(path, stack)
    sources = _sources(st, cfg)
    for checks, _ in sources.values():       # every tensor is validated before any read
      for name, shape in checks:
        st.check(name, shape)

    def make(kpath, var):
      key = state_key(kpath)
      if key not in sources:
        raise ValueError(f"load_hf_checkpoint: no checkpoint source for parameter {key}")
      _, block = sources[key]
      shape = var.get_value().shape if hasattr(var, "get_value") else var.value.shape
      sharding = NamedSharding(mesh, logical_to_spec(var.get_metadata()["axes"]))
      arr = jax.make_array_from_callback(
          shape, sharding, lambda idx: np.ascontiguousarray(block(idx)).astype(np_dtype))
      return var.replace(arr)

    state = jax.tree_util.tree_map_with_path(make, abstract, is_leaf=_is_var)
  return nnx.merge(graphdef, state)


# --- orbax checkpoints of our own layout ----------------------------------------------------------

def save_checkpoint(model: Transformer, path: str | os.PathLike) -> None:
  """Save the (sharded) parameters with orbax; each host writes the shards it owns.

  ``path`` must not exist yet (orbax writes a new directory).
  """
  import orbax.checkpoint as ocp
  if not isinstance(model, Transformer):
    raise TypeError(f"save_checkpoint: model must be a weave_jax Transformer, got "
                    f"{type(model).__name__}")
  path = _abs_path(path, "save_checkpoint")
  if os.path.exists(path):
    raise ValueError(f"save_checkpoint: {path} already exists")
  if not os.path.isdir(os.path.dirname(path)):
    raise ValueError(f"save_checkpoint: the parent directory of {path} does not exist")
  state = nnx.state(model)
  ckpt = ocp.StandardCheckpointer()
  try:
    ckpt.save(path, state)
    ckpt.wait_until_finished()
  finally:
    ckpt.close()


def restore_checkpoint(path: str | os.PathLike, cfg: ModelConfig, mesh: Mesh) -> Transformer:
  """Restore a ``save_checkpoint`` directory straight into the TP-sharded layout of ``mesh``.

  The model is laid out for the mesh (``cfg.for_tp``).  A checkpoint saved with another count
  of KV-head replicas (another TP size) is restored in its own layout, its attention weights
  sharded by the hidden dimension, and relaid on device.
  """
  import orbax.checkpoint as ocp
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"restore_checkpoint: cfg must be a ModelConfig, got {type(cfg).__name__}")
  path = _abs_path(path, "restore_checkpoint")
  tp = check_mesh(mesh, "restore_checkpoint")
  cfg = cfg.for_tp(tp)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"restore_checkpoint: no checkpoint directory at {path}")
  ckpt = ocp.StandardCheckpointer()
  try:
    # Compare against the saved metadata first: a restore that fails half-way leaves orbax's
    # background reads pending, and they fail noisily once the event loop is gone.
    try:
      saved = _leaf_table(getattr(ckpt.metadata(path), "item_metadata", None) or {})
    except (OSError, ValueError) as e:
      raise ValueError(f"restore_checkpoint: {path} is not an orbax checkpoint ({e})") from None
    if not saved:
      raise ValueError(f"restore_checkpoint: {path} is not an orbax checkpoint (no arrays)")
    saved_cfg = _saved_layout(saved, cfg)
    targets = _restore_targets(saved_cfg, mesh, transit=saved_cfg != cfg)
    mismatch = _first_mismatch(saved, _leaf_table(targets))
    if mismatch:
      raise ValueError(f"restore_checkpoint: {path} does not match the {cfg.family} config "
                       f"(hidden={cfg.hidden_size}, layers={cfg.num_layers}): {mismatch}")
    state = ckpt.restore(path, targets)
  finally:
    ckpt.close()
  graphdef, abstract = nnx.split(abstract_model(cfg))
  if saved_cfg != cfg:
    relayout = lambda s: relayout_kv_state(s, saved_cfg.kv_replicas, cfg.kv_replicas)
    state = jax.jit(relayout, out_shardings=state_shardings(abstract, mesh))(state)
  return nnx.merge(graphdef, state)


def _abs_path(path, where: str) -> str:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
  return os.path.abspath(os.fspath(path))


_QKV_KEY = ("layers", 0, "attn", "qkv", "value")


def _saved_layout(saved: dict, cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with the KV-head replica count the checkpoint was saved with (``cfg`` itself when
  the checkpoint holds no readable qkv or another model)."""
  shape = saved.get(_QKV_KEY, ((),))[0]
  if len(shape) != 4 or shape[1] == cfg.num_kv_heads or shape[1] % cfg.checkpoint_kv_heads:
    return cfg
  try:
    return cfg.replace(num_kv_heads=shape[1],
                       kv_replicas=shape[1] // cfg.checkpoint_kv_heads)
  except ValueError:
    return cfg


def _restore_targets(cfg: ModelConfig, mesh: Mesh, transit: bool):
  """ShapeDtypeStructs of ``cfg``'s parameters with their shardings on ``mesh``.  ``transit``:
  attention weights sharded by the hidden dimension instead (a layout about to be relaid)."""
  tp = mesh.shape[AXIS]

  def target(kpath, var):
    value = var.get_value()
    spec = logical_to_spec(var.get_metadata()["axes"])
    key = state_key(kpath)
    if transit and key[-2:] in (("attn", "qkv"), ("attn", "o"), ("attn", "qkv_bias")):
      axes = [None] * value.ndim
      hidden = 0 if key[-1] == "qkv" else value.ndim - 1
      if key[-1] != "qkv_bias" and value.shape[hidden] % tp == 0:
        axes[hidden] = AXIS
      spec = P(*axes)
    sharding = NamedSharding(mesh, spec)
    return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

  _, abstract = nnx.split(abstract_model(cfg))
  return jax.tree_util.tree_map_with_path(target, abstract, is_leaf=_is_var)


def _leaf_table(tree) -> dict[tuple, tuple]:
  """{plain key path: (shape, dtype name)} for every array leaf of a state or its metadata."""
  return {state_key(p): (tuple(x.shape), np.dtype(x.dtype).name)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _first_mismatch(saved: dict, wanted: dict) -> str:
  """'' when the two leaf tables agree, else a sentence naming the first difference."""
  for name, keys in (("missing from the checkpoint", wanted.keys() - saved.keys()),
                     ("not in the config", saved.keys() - wanted.keys())):
    if keys:
      return (f"{len(keys)} array{'s' * (len(keys) > 1)} {name}, "
              f"e.g. {_path_name(min(keys, key=str))}")
  for key in sorted(wanted, key=str):
    if saved[key] != wanted[key]:
      return (f"{_path_name(key)} is {saved[key][0]} {saved[key][1]} in the checkpoint, "
              f"{wanted[key][0]} {wanted[key][1]} in the config")
  return ""


def _path_name(key: tuple) -> str:
  """A ``_key`` path as the messages print it, e.g. layers/0/attn/qkv/value."""
  return "/".join(map(str, key))
