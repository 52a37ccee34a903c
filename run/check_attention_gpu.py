"""Check every ragged paged attention kernel present against a float32 reference on random
ragged layouts, on one GPU.

    python run/check_attention_gpu.py                  # 216 layouts, every impl present
    python run/check_attention_gpu.py --layouts 24 --impl triton

Layouts: decodes and prefill chunks mixed, 1 to 256 requests, contexts up to 32K, page sizes
16/32/64/128, GQA 32/8 (Llama-3.1-8B) and 32/4 (Llama-70B at TP2), head dims 64 and 128,
bfloat16 and float16.  Every slot a layout does not use (the tail of each request's last page,
whole unused pages, the block-table columns beyond a request's pages, the query rows of padding
tokens) holds NaN, so a kernel that reads one into its result fails.  Padding rows must come back
exactly 0.

The reference is float32 softmax attention (HIGHEST matmul precision) computed on the GPU over
chunks of query rows, each gathering only its own requests' pages, so memory stays bounded at
32K contexts.  Shapes are bucketed per (config, kind) as the serving engine buckets its steps,
so each kernel compiles a handful of times, not once per layout.

Tolerance on max|out - ref| / max|ref| over a layout's valid rows: bfloat16 2e-2, float16 4e-3.
Prints one table row per (impl, config, kind) and exits 1 on any mismatch, NaN, nonzero padding
row, or kernel error; 2 when no GPU is visible.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):                                     # run as a script from the repo
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from pallas_kernels import attention  # noqa: E402
from pallas_kernels.paged_attention_ref import token_requests  # noqa: E402

TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3}


@dataclasses.dataclass(frozen=True)
class Config:
  """Cache geometry of one group of layouts."""
  page: int
  q_heads: int
  kv_heads: int
  head_dim: int
  dtype: str

  @property
  def name(self) -> str:
    return (f"p{self.page} {self.q_heads}/{self.kv_heads} D{self.head_dim} "
            f"{'bf16' if self.dtype == 'bfloat16' else 'fp16'}")


@dataclasses.dataclass(frozen=True)
class Kind:
  """Static step shape (tokens T, sequences S, context bound) and the request mix."""
  name: str
  tokens: int
  seqs: int
  context: int
  max_chunk: int
  prefill_frac: float
  min_context: int = 1


#: Each page size, GQA ratio, head dim and dtype appears in at least one config.
CONFIGS = (
    Config(16, 32, 8, 128, "bfloat16"),
    Config(32, 32, 4, 128, "bfloat16"),
    Config(64, 32, 8, 64, "float16"),
    Config(128, 32, 4, 128, "float16"),
    Config(16, 32, 4, 64, "bfloat16"),
    Config(128, 32, 8, 128, "bfloat16"),
)
KINDS = (
    Kind("decode", tokens=256, seqs=256, context=4096, max_chunk=16, prefill_frac=0.1),
    Kind("mixed", tokens=2048, seqs=64, context=4096, max_chunk=1024, prefill_frac=0.3),
    Kind("long", tokens=64, seqs=8, context=32768, max_chunk=48, prefill_frac=0.25,
         min_context=1024),
)
#: Cache tokens of the page pool of every layout (and the most a layout's contexts may sum to).
POOL_TOKENS = 1 << 19


@dataclasses.dataclass
class Layout:
  """Host metadata of one step plus the pool rows each page uses (for the NaN poison)."""
  kv_lens: np.ndarray          # (S,) int32
  block_tables: np.ndarray     # (S, M) int32
  query_start_loc: np.ndarray  # (S + 1,) int32
  num_seqs: int
  num_tokens: int              # T (static)
  page_rows: np.ndarray        # (P,) int32: rows of each page holding live tokens
  summary: str


def random_layout(rng: np.random.Generator, kind: Kind, page: int, num_pages: int,
                  num_reqs: int | None = None) -> Layout:
  """A random step of ``kind`` (``num_reqs`` requests, default log-uniform in 1..S): decodes
  first, then prefill chunks; padding tokens and padding sequences after them.  Pages are
  scattered over the pool in random order."""
  t, s, m = kind.tokens, kind.seqs, -(-kind.context // page)
  max_reqs = min(s, t)
  if num_reqs is None:
    num_reqs = int(np.exp(rng.uniform(0, math.log(max_reqs + 1))))
  num_reqs = max(1, min(num_reqs, max_reqs))
  budget = t - int(rng.integers(0, max(1, t // 8)))             # leave some padding tokens
  num_reqs = min(num_reqs, budget)                               # every request >= 1 token
  q_lens = []
  for i in range(num_reqs):
    left = budget - sum(q_lens) - (num_reqs - i - 1)
    if left < 1:
      break
    chunk = rng.random() < kind.prefill_frac and left >= 2
    q_lens.append(int(rng.integers(2, min(kind.max_chunk, left) + 1)) if chunk else 1)
  q_lens.sort(key=lambda q: q > 1)                               # decodes first, as scheduled
  n = len(q_lens)
  ctx_cap = min(kind.context, (num_pages - 8) // n * page)       # keep 8 pages never used
  low = math.log(min(kind.min_context, ctx_cap))
  kv_lens = [max(q, int(np.exp(rng.uniform(low, math.log(ctx_cap))))) for q in q_lens]
  used = [-(-kv // page) for kv in kv_lens]
  pool = rng.permutation(num_pages).astype(np.int32)
  spare = pool[sum(used):]                                      # never used: poisoned pages
  tables = rng.choice(spare, size=(s, m)).astype(np.int32)       # unused columns -> poison
  page_rows = np.zeros(num_pages, np.int32)
  start = 0
  for i, (kv, u) in enumerate(zip(kv_lens, used)):
    pages = pool[start:start + u]
    start += u
    tables[i, :u] = pages
    page_rows[pages] = page
    page_rows[pages[-1]] = kv - (u - 1) * page
  qsl = np.zeros(s + 1, np.int32)
  qsl[1:n + 1] = np.cumsum(q_lens)
  qsl[n + 1:] = qsl[n]
  lens = rng.integers(1, m * page + 1, size=s).astype(np.int32)  # padding sequences: junk
  lens[:n] = kv_lens
  decodes = sum(q == 1 for q in q_lens)
  summary = (f"{n} reqs ({decodes} decodes, chunks {[q for q in q_lens if q > 1][:4]}), "
             f"max ctx {max(kv_lens)}, {t - qsl[n]} pad tokens")
  return Layout(lens, tables, qsl, n, t, page_rows, summary)


def make_inputs(layout: Layout, base_k, base_v, key, q_heads: int):
  """Device inputs of a layout: q (T, N, D) random, NaN on padding rows; the pool with NaN in
  every row the layout does not use."""
  num_pages, page, _, d = base_k.shape
  rows = jnp.asarray(layout.page_rows)
  live = (jnp.arange(page)[None, :] < rows[:, None])[..., None, None]
  k_pages = jnp.where(live, base_k, jnp.nan).astype(base_k.dtype)
  v_pages = jnp.where(live, base_v, jnp.nan).astype(base_v.dtype)
  t = layout.num_tokens
  q = jax.random.normal(key, (t, q_heads, d), jnp.float32)
  q = jnp.where((jnp.arange(t) < layout.query_start_loc[layout.num_seqs])[:, None, None], q,
                jnp.nan).astype(base_k.dtype)
  meta = (jnp.asarray(layout.kv_lens), jnp.asarray(layout.block_tables),
          jnp.asarray(layout.query_start_loc), jnp.int32(layout.num_seqs))
  return (q, k_pages, v_pages, *meta)


def chunk_rows(length: int) -> int:
  """Query rows per reference chunk: about 2^19 (row, key slot) pairs per chunk."""
  return int(min(256, max(8, 1 << int(math.log2(max(1, (1 << 19) // length))))))


@functools.partial(jax.jit, static_argnames=("chunk",))
def chunked_reference(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
                      chunk: int):
  """Float32 attention, ``chunk`` query rows at a time; each row gathers its request's pages.
  Loops only over the chunks that hold live rows.  Returns (T, N, D) float32 (padding rows 0)."""
  t, n, d = q.shape
  _, page, k, _ = k_pages.shape
  m = block_tables.shape[1]
  g, length = n // k, m * page
  req, offset, valid = token_requests(query_start_loc, num_seqs, t)
  q_len = query_start_loc[req + 1] - query_start_loc[req]
  pos = kv_lens[req] - q_len + offset
  pad = -t % chunk
  qf = jnp.pad(q.astype(jnp.float32), ((0, pad), (0, 0), (0, 0))).reshape(-1, k, g, d)
  req, pos = jnp.pad(req, (0, pad)), jnp.pad(pos, (0, pad))
  valid = jnp.pad(valid, (0, pad))
  hi = jax.lax.Precision.HIGHEST

  def body(c, out):
    rows = c * chunk + jnp.arange(chunk)
    pages = block_tables[req[rows]]                              # (C, M)
    seen = jnp.arange(length)[None, :] <= pos[rows][:, None]      # (C, L)
    keys = k_pages[pages].reshape(chunk, length, k, d).astype(jnp.float32)
    vals = v_pages[pages].reshape(chunk, length, k, d).astype(jnp.float32)
    keys = jnp.where(seen[..., None, None], keys, 0.0)
    vals = jnp.where(seen[..., None, None], vals, 0.0)
    scores = jnp.einsum("ckgd,clkd->ckgl", qf[rows] / math.sqrt(d), keys, precision=hi)
    scores = jnp.where(seen[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("ckgl,clkd->ckgd", probs, vals, precision=hi).reshape(chunk, n, d)
    o = jnp.where(valid[rows][:, None, None], o, 0.0)
    return jax.lax.dynamic_update_slice(out, o, (c * chunk, 0, 0))

  live_chunks = -(-query_start_loc[num_seqs] // chunk)
  out = jax.lax.fori_loop(0, live_chunks, body, jnp.zeros((t + pad, n, d), jnp.float32))
  return out[:t]


@jax.jit
def compare(out, ref, query_start_loc, num_seqs):
  """(max|out - ref| over valid rows, max|ref|, NaNs in valid rows, nonzero padding rows)."""
  valid = (jnp.arange(out.shape[0]) < query_start_loc[num_seqs])[:, None, None]
  o = out.astype(jnp.float32)
  err = jnp.max(jnp.where(valid, jnp.abs(o - ref), 0.0))
  nans = jnp.sum(valid & jnp.isnan(o))
  bad_pad = jnp.sum(~valid & (o != 0))
  return err, jnp.max(jnp.abs(ref)), nans, bad_pad


def impls_present(arch: str) -> tuple[list[str], list[str]]:
  """(kernels to check, notes on those left out).  Triton is always checked on a GPU (a missing
  jax-triton is a failure, not a skip); Mosaic when its module imports and the GPU is sm_90."""
  reason = attention.unavailable_reason("mosaic", arch)
  return (["triton"], [f"mosaic: not checked ({reason})"]) if reason else (["triton", "mosaic"], [])


def run_check(num_layouts: int = 216, impls: list[str] | None = None, seed: int = 0,
              verbose: bool = False, configs=CONFIGS, kinds=KINDS) -> list[dict]:
  """Check ``impls`` (default: every one present) on ``num_layouts`` layouts spread over
  ``configs`` x ``kinds``.  Returns one row per (impl, config, kind) with keys impl, config,
  kind, layouts, worst (max rel. error), tol, failures (list of str)."""
  arch = attention.device_arch()
  if impls is None:
    impls, notes = impls_present(arch)
    for note in notes:
      print(f"[check_attention] {note}")
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  groups = [(c, k) for c in configs for k in kinds]
  per_group = [num_layouts // len(groups) + (i < num_layouts % len(groups))
               for i in range(len(groups))]
  fns = {impl: jax.jit(functools.partial(attention.ragged_paged_attention, impl=impl))
         for impl in impls}
  rows = []
  for (cfg, kind), count in zip(groups, per_group):
    if not count:
      continue
    num_pages = POOL_TOKENS // cfg.page
    key, kk, kv = jax.random.split(key, 3)
    shape = (num_pages, cfg.page, cfg.kv_heads, cfg.head_dim)
    base_k = jax.random.normal(kk, shape, jnp.float32).astype(cfg.dtype)
    base_v = jax.random.normal(kv, shape, jnp.float32).astype(cfg.dtype)
    stats = {impl: {"worst": 0.0, "failures": []} for impl in impls}
    for _ in range(count):
      layout = random_layout(rng, kind, cfg.page, num_pages)
      key, kq = jax.random.split(key)
      args = make_inputs(layout, base_k, base_v, kq, cfg.q_heads)
      ref = chunked_reference(*args, chunk=chunk_rows(kind.context))
      for impl in impls:
        st = stats[impl]
        try:
          out = fns[impl](*args)
          err, scale, nans, bad_pad = (float(x) for x in compare(out, ref, args[5], args[6]))
        except Exception as exc:  # noqa: BLE001 -- a kernel error is a failed layout, reported
          st["failures"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
          if verbose:
            traceback.print_exc()
          continue
        rel = err / max(scale, 1e-6) if not nans else math.inf
        st["worst"] = max(st["worst"], rel)
        if rel >= TOLERANCE[cfg.dtype] or nans or bad_pad or not math.isfinite(rel):
          st["failures"].append(f"rel {rel:.2e}, {int(nans)} NaN, {int(bad_pad)} nonzero pad "
                                f"values: {layout.summary}")
    for impl in impls:
      rows.append(dict(impl=impl, config=cfg.name, kind=kind.name, layouts=count,
                       worst=stats[impl]["worst"], tol=TOLERANCE[cfg.dtype],
                       failures=stats[impl]["failures"]))
      r = rows[-1]                                # progress: a long check may be cut short
      print(f"[check_attention] {impl} {cfg.name} {kind.name}: {count} layouts, max rel err "
            f"{r['worst']:.2e}, {len(r['failures'])} failed", flush=True)
  return rows


def print_table(rows: list[dict]) -> None:
  print(f"{'impl':8} {'config':22} {'kind':7} {'layouts':>7} {'max rel err':>12} {'tol':>7}  "
        "result")
  for r in rows:
    result = "ok" if not r["failures"] else f"FAIL ({len(r['failures'])})"
    print(f"{r['impl']:8} {r['config']:22} {r['kind']:7} {r['layouts']:7d} {r['worst']:12.2e} "
          f"{r['tol']:7.0e}  {result}")
  for r in rows:
    for f in r["failures"][:3]:
      print(f"  {r['impl']} {r['config']} {r['kind']}: {f}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layouts", type=int, default=216)
  parser.add_argument("--impl", action="append", choices=("triton", "mosaic"),
                      help="check only this impl (repeatable); default: every one present")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--verbose", action="store_true", help="print kernel tracebacks")
  args = parser.parse_args()
  if attention.device_arch() == "cpu":
    print("[check_attention] no GPU visible to JAX")
    return 2
  start = time.perf_counter()
  rows = run_check(args.layouts, args.impl, args.seed, args.verbose)
  print_table(rows)
  failed = sum(len(r["failures"]) for r in rows)
  total = sum(r["layouts"] for r in rows)
  print(f"[check_attention] {jax.devices()[0].device_kind}: {total} impl-layouts, {failed} "
        f"failed, {time.perf_counter() - start:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
