"""Ragged paged attention on CPU: the float32 reference against dense float64 attention built
per request from its pages, the input checks, the dispatch, and the Triton kernel's logic run in
Triton's interpreter (a subprocess with TRITON_INTERPRET=1, torch CPU tensors).

Random layouts come from run/check_attention_gpu.py (the GPU check uses the same generator):
decodes and prefill chunks mixed, padding tokens and padding sequences, pages scattered over the
pool, NaN in every slot and page a layout does not use and in the padding query rows.
"""
from __future__ import annotations

import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from conftest import load_module, run_interpreter_cases  # noqa: E402
from pallas_kernels import attention  # noqa: E402
from pallas_kernels.paged_attention_ref import ragged_paged_attention_reference  # noqa: E402


check = load_module(ROOT / "run" / "check_attention_gpu.py", "check_attention_gpu")


def small_layout(seed, *, page, kv_heads, group, head_dim, dtype, tokens=40, seqs=6,
                 context=300, max_chunk=24, min_context=1):
  """(inputs, layout) of a small random step with seqs - 1 requests (numpy-built: no per-shape
  compiles); unused slots, pages and padding query rows are NaN."""
  rng = np.random.default_rng(seed)
  kind = check.Kind("cpu", tokens=tokens, seqs=seqs, context=context, max_chunk=max_chunk,
                    prefill_frac=0.5, min_context=min_context)
  num_pages = seqs * -(-context // page) + 8
  layout = check.random_layout(rng, kind, page, num_pages, num_reqs=seqs - 1)
  shape = (num_pages, page, kv_heads, head_dim)
  live = (np.arange(page)[None, :] < layout.page_rows[:, None])[..., None, None]
  k_pages = np.where(live, rng.standard_normal(shape), np.nan)
  v_pages = np.where(live, rng.standard_normal(shape), np.nan)
  t = layout.num_tokens
  q = rng.standard_normal((t, kv_heads * group, head_dim))
  q[layout.query_start_loc[layout.num_seqs]:] = np.nan
  arrays = (jnp.asarray(a.astype(np.float32)).astype(dtype) for a in (q, k_pages, v_pages))
  meta = (jnp.asarray(layout.kv_lens), jnp.asarray(layout.block_tables),
          jnp.asarray(layout.query_start_loc), jnp.int32(layout.num_seqs))
  return (*arrays, *meta), layout


reference = jax.jit(ragged_paged_attention_reference)


def dense_attention(q, k_pages, v_pages, layout):
  """Float64 numpy: per request, its dense K/V from its pages, causal softmax attention."""
  q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
  t, n, d = q.shape
  _, page, k, _ = k_pages.shape
  g = n // k
  out = np.zeros((t, n, d))
  qsl = layout.query_start_loc
  for i in range(layout.num_seqs):
    kv_len = int(layout.kv_lens[i])
    pages = layout.block_tables[i, :-(-kv_len // page)]
    keys = k_pages[pages].reshape(-1, k, d)[:kv_len]             # (L, K, D)
    vals = v_pages[pages].reshape(-1, k, d)[:kv_len]
    q_len = int(qsl[i + 1] - qsl[i])
    for j in range(q_len):
      pos = kv_len - q_len + j
      for h in range(n):
        s = keys[:pos + 1, h // g] @ q[qsl[i] + j, h] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[qsl[i] + j, h] = p @ vals[:pos + 1, h // g] / p.sum()
  return out


# (page, kv_heads, group, head_dim): GQA 1/4/8, every page size, both head dims
REFERENCE_CASES = [(16, 2, 1, 64), (32, 2, 4, 128), (64, 1, 8, 64), (128, 2, 4, 64),
                   (16, 1, 8, 128)]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: f"p{c[0]}-k{c[1]}-g{c[2]}-d{c[3]}")
def test_reference_matches_dense_attention(case):
  page, kv_heads, group, head_dim = case
  args, layout = small_layout(sum(case), page=page, kv_heads=kv_heads, group=group,
                              head_dim=head_dim, dtype=jnp.float32)
  assert layout.num_seqs < len(layout.kv_lens) or layout.num_tokens > layout.query_start_loc[-1]
  out = np.asarray(reference(*args))
  assert not np.isnan(out).any(), "a NaN-poisoned unused slot or page reached the output"
  want = dense_attention(args[0], args[1], args[2], layout)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)


def test_reference_bf16_rounds_only_the_output():
  args, layout = small_layout(7, page=16, kv_heads=2, group=4, head_dim=64, dtype=jnp.bfloat16)
  out = np.asarray(reference(*args).astype(jnp.float32))
  want = dense_attention(args[0], args[1], args[2], layout)
  assert np.abs(out - want).max() <= 1e-2 * np.abs(want).max()


def test_dispatch_auto_on_cpu_is_the_reference():
  args, _ = small_layout(3, page=32, kv_heads=1, group=2, head_dim=64, dtype=jnp.float32,
                         tokens=16, seqs=3, context=64)
  host = [np.asarray(a) for a in args[3:6]] + [int(args[6])]
  out = attention.ragged_paged_attention(*args[:3], *host)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference(*args)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
def test_dispatch_refuses_a_kernel_that_cannot_run_here(impl):
  args, _ = small_layout(3, page=16, kv_heads=2, group=4, head_dim=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=f"impl='{impl}' cannot run here: it needs an NVIDIA GPU"):
    attention.ragged_paged_attention(*args, impl=impl)
  with pytest.raises(ValueError, match="impl='flash' is not one of"):
    attention.ragged_paged_attention(*args, impl="flash")


def test_auto_picks_only_verified_kernels(monkeypatch):
  monkeypatch.setattr(attention, "unavailable_reason", lambda impl, arch, dtype="": None)
  monkeypatch.setitem(attention.VERIFIED, "sm_90", ())
  attention.resolve_impl.cache_clear()
  with pytest.warns(UserWarning, match="no attention kernel is verified"):
    assert attention.resolve_impl("auto", "sm_90") == "reference"
  monkeypatch.setitem(attention.VERIFIED, "sm_90", ("triton",))
  attention.resolve_impl.cache_clear()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert attention.resolve_impl("auto", "sm_90") == "triton"
  monkeypatch.setitem(attention.VERIFIED, "sm_90", ("triton", "mosaic"))
  attention.resolve_impl.cache_clear()
  assert attention.resolve_impl("auto", "sm_90") == "mosaic"
  attention.resolve_impl.cache_clear()


def test_triton_refuses_float32_by_name():
  reason = attention.unavailable_reason("triton", "sm_90", "float32")
  assert reason == "it supports bfloat16/float16, the inputs are float32"


def _host_case():
  """A valid layout with host metadata (so the dispatch runs the value checks)."""
  args, layout = small_layout(11, page=16, kv_heads=2, group=4, head_dim=64, dtype=jnp.float32)
  meta = dict(kv_lens=layout.kv_lens.copy(), block_tables=layout.block_tables.copy(),
              query_start_loc=layout.query_start_loc.copy(), num_seqs=layout.num_seqs)
  return args, meta, layout


def _call(args, meta, **over):
  q, k_pages, v_pages = over.pop("q", args[0]), over.pop("k_pages", args[1]), args[2]
  meta = {**meta, **over}
  return attention.ragged_paged_attention(q, k_pages, v_pages, meta["kv_lens"],
                                          meta["block_tables"], meta["query_start_loc"],
                                          meta["num_seqs"])


def test_searchsorted_right_matches_numpy_without_a_loop():
  """The requests/tiles/programs lookup the kernels' XLA side runs every attention layer: same
  answer as a binary search, lowered without a while loop (on GPU each trip's predicate goes
  back to the host)."""
  from pallas_kernels.paged_attention_ref import searchsorted_right
  rng = np.random.default_rng(0)
  ends = np.sort(rng.integers(0, 50, 17)).astype(np.int32)
  x = np.arange(-2, 60, dtype=np.int32)
  got = searchsorted_right(jnp.asarray(ends), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), np.searchsorted(ends, x, side="right"))
  assert got.dtype == jnp.int32
  text = jax.jit(searchsorted_right).lower(ends, x).as_text()
  assert "while" not in text


def test_triton_wrapper_metadata_lowers_without_loops():
  """The Triton path's XLA-side schedule (request of each row, query blocks, split counts) holds
  no while loop either."""
  pytest.importorskip("triton")
  from pallas_kernels import ragged_paged_attention_triton as rpt
  qsl = jnp.asarray([0, 1, 2, 40, 41], jnp.int32)
  kv_lens = jnp.asarray([300, 20, 64, 7], jnp.int32)
  plan = rpt.make_plan(48, 4, 8, 2, 64, 16, 32)

  def metadata(qsl, kv_lens, num_seqs):
    q_lens = rpt.query_lens(qsl, num_seqs)
    return (rpt.token_owner(qsl, 48), rpt.decode_schedule(q_lens, 1),
            rpt.prefill_schedule(q_lens, 1, 16, 8), rpt.split_counts(kv_lens, q_lens, num_seqs, 2,
                                                                     plan))

  text = jax.jit(metadata).lower(qsl, kv_lens, jnp.int32(4)).as_text()
  assert "while" not in text
  owner, _, (req, qb), _ = jax.jit(metadata)(qsl, kv_lens, jnp.int32(4))
  want = np.minimum(np.searchsorted(np.asarray(qsl[1:]), np.arange(48), side="right"), 3)
  np.testing.assert_array_equal(np.asarray(owner), want)
  np.testing.assert_array_equal(np.asarray(req[:3]), [2, 2, 2])
  np.testing.assert_array_equal(np.asarray(qb[:3]), [0, 1, 2])


def test_input_checks_name_the_argument():
  args, meta, layout = _host_case()
  pages = args[1].shape[0]
  bt = meta["block_tables"].copy()
  bt[0, 0] = pages + 3
  with pytest.raises(ValueError, match=r"block_tables\[0\] holds page ids outside the pool"):
    _call(args, meta, block_tables=bt)
  bt[0, 0] = -1
  with pytest.raises(ValueError, match=r"block_tables\[0\] holds page ids outside the pool"):
    _call(args, meta, block_tables=bt)
  kv = meta["kv_lens"].copy()
  kv[0] = bt.shape[1] * args[1].shape[1] + 1
  with pytest.raises(ValueError, match=r"kv_lens\[0\]=\d+ exceeds its block table"):
    _call(args, meta, kv_lens=kv)
  qsl = meta["query_start_loc"].copy()
  qsl[layout.num_seqs:] = args[0].shape[0] + 1
  with pytest.raises(ValueError, match=r"query_start_loc\[num_seqs\]=\d+ exceeds the \d+ query"):
    _call(args, meta, query_start_loc=qsl)
  with pytest.raises(ValueError, match="num_seqs=99 outside"):
    _call(args, meta, num_seqs=99)
  with pytest.raises(ValueError, match=r"head dim of q \(32\) != head dim of k_pages \(64\)"):
    _call(args, meta, q=args[0][..., :32])
  with pytest.raises(TypeError, match="k_pages dtype bfloat16 != q dtype float32"):
    _call(args, meta, k_pages=args[1].astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="query heads N=7 are not a multiple of kv heads K=2"):
    _call(args, meta, q=args[0][:, :7])
  with pytest.raises(ValueError, match=r"q must be \(T, N, D\)"):
    _call(args, meta, q=args[0][0])


def test_input_checks_kv_lens_shorter_than_queries():
  args, meta, layout = _host_case()
  qsl = meta["query_start_loc"]
  i = int(np.argmax(np.diff(qsl)[:layout.num_seqs]))               # the longest request
  kv = meta["kv_lens"].copy()
  kv[i] = int(qsl[i + 1] - qsl[i]) - 1
  with pytest.raises(ValueError, match=rf"kv_lens\[{i}\]=\d+ is shorter than the request's"):
    _call(args, meta, kv_lens=kv)


def _compile_for_gpu(cc: int, *, dtype: str, head_dim: int, page: int, group: int, kv_heads: int,
                     decode: bool):
  """Compile the kernel for an NVIDIA target with the launch parameters ``make_plan`` picks
  (needs only the ptxas bundled with triton, no GPU)."""
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  from pallas_kernels import ragged_paged_attention_triton as rpa
  t, s, m = (256, 256, 4096 // page) if decode else (2048, 64, 4096 // page)
  plan = rpa.make_plan(t, s, kv_heads * group, kv_heads, head_dim, page, m, compute_capability=cc)
  block_m = plan.decode_block_m if decode else plan.prefill_block_m
  splits = plan.num_splits if decode else 1
  ptr = "*" + dtype
  names = ["q", "k", "v", "kv_lens", "block_tables", "qsl", "blk_req", "blk_qb", "splits",
           "o_init"]
  signature = {f"{n}_ptr": ty for n, ty in zip(names, [ptr] * 3 + ["*i32"] * 6 + [ptr])}
  signature.update(num_tokens="i32", max_pages="i32", o_ptr=ptr if splits == 1 else "*fp32",
                   lse_ptr="*fp32")
  consts = dict(scale_log2=0.18, KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page,
                BLOCK_M=block_m, BLOCK_Q=block_m // group, BLOCK_N=plan.block_n,
                NUM_SPLITS=splits)
  signature.update({name: "constexpr" for name in consts})
  # as jax_triton specializes: every array 16-byte aligned, scalars unspecialized
  attrs = {(i,): [["tt.divisibility", 16]] for i in (*range(len(names)), len(names) + 2,
                                                     len(names) + 3)}
  src = ASTSource(fn=rpa._rpa_kernel, signature=signature, constexprs=consts, attrs=attrs)
  warps = plan.decode_warps if decode else plan.prefill_warps
  return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options=dict(num_warps=warps, num_stages=plan.num_stages))


@pytest.mark.parametrize("cc,decode,dtype,head_dim,page,group,kv_heads", [
    (90, True, "bf16", 128, 16, 4, 8), (90, False, "bf16", 128, 16, 4, 8),
    (80, False, "fp16", 64, 64, 8, 4)], ids=["sm90-decode", "sm90-prefill", "sm80-prefill"])
def test_triton_kernel_compiles_for_gpu(cc, decode, dtype, head_dim, page, group, kv_heads):
  """What the interpreter cannot catch: tl.dot shape/dtype rules, layouts, shared memory."""
  kernel = _compile_for_gpu(cc, dtype=dtype, head_dim=head_dim, page=page, group=group,
                            kv_heads=kv_heads, decode=decode)
  assert kernel.asm["cubin"] and kernel.metadata.shared <= 160 * 1024


# ---------------------------------------------------------------------------------------------
# The Triton kernel's math in Triton's interpreter (subprocess: TRITON_INTERPRET must be set
# before triton decorates the kernel, and must not leak into GPU tests of the same process).
# ---------------------------------------------------------------------------------------------

# (page, kv_heads, group, head_dim, tokens, seqs, context, min context, max_chunk, overrides)
INTERPRETER_CASES = [
    (16, 2, 4, 64, 40, 6, 300, 40, 24, {}),                         # decodes + chunks
    (64, 1, 8, 64, 12, 3, 1600, 1100, 4, {"num_splits": 4}),        # split-KV decodes
    (32, 1, 3, 64, 40, 4, 200, 60, 30, {"block_n": 16}),            # G=3, tile < page
    (16, 2, 1, 64, 48, 3, 120, 50, 40, {"prefill_block_m": 16, "block_n": 32}),  # many q blocks
    (128, 1, 4, 128, 10, 3, 400, 130, 6, {}),                       # D=128, page 128
]


def _to_torch(x):
  import torch
  if isinstance(x, int):                                           # a scalar kernel argument
    return x
  a = np.asarray(x)
  return torch.from_numpy(np.array(a))                             # writable copy


def _torch_launch(kernel, inputs, out_shapes, *, grid, num_warps, num_stages, alias, zeroed,
                  **constexprs):
  """jax_triton.triton_call's contract on torch CPU tensors: outputs after the inputs, aliased
  outputs start as their input, zeroed outputs as 0, all others as NaN (so a row no program
  writes shows)."""
  import torch
  ins = [_to_torch(x) for x in inputs]
  source = {out: inp for inp, out in (alias or {}).items()}
  outs = []
  for i, sd in enumerate(out_shapes):
    dtype = getattr(torch, jnp.dtype(sd.dtype).name)
    if i in source:
      outs.append(ins[source[i]].clone())
    else:
      outs.append(torch.full(sd.shape, 0.0 if i in zeroed else float("nan"), dtype=dtype))
  kernel[grid](*ins, *outs, **constexprs)
  return [jnp.asarray(o.numpy()) for o in outs]


def _patch_interpreter_index():
  """Triton 3.6's interpreter turns loop bounds into ints with int(1-element array), which
  NumPy 2.5 refuses; take the element instead."""
  import triton.runtime.interpreter as interp
  original = interp._patch_lang_tensor

  def patched(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

  interp._patch_lang_tensor = patched


def _interpreter_main() -> int:
  """Run the interpreter cases (float16: the 3.6 interpreter's bf16 tl.dot is wrong)."""
  _patch_interpreter_index()
  from pallas_kernels.ragged_paged_attention_triton import ragged_paged_attention_triton
  failures = 0
  for n, (page, kv_heads, group, d, tokens, seqs, context, min_context, chunk, over) in (
      enumerate(INTERPRETER_CASES)):
    args, layout = small_layout(100 + n, page=page, kv_heads=kv_heads, group=group,
                                head_dim=d, dtype=jnp.float16, tokens=tokens, seqs=seqs,
                                context=context, max_chunk=chunk, min_context=min_context)
    out = np.asarray(ragged_paged_attention_triton(*args, launch=_torch_launch, **over),
                     np.float32)
    want = dense_attention(args[0], args[1], args[2], layout)
    err = np.abs(out - want).max() / np.abs(want).max()
    ok = not np.isnan(out).any() and err < 4e-3
    failures += not ok
    print(f"case {n} p{page} k{kv_heads} g{group} d{d} {over}: {layout.summary}: rel err "
          f"{err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
  return 1 if failures else 0


def test_triton_kernel_in_interpreter():
  run_interpreter_cases(__file__, len(INTERPRETER_CASES), timeout=600)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
  sys.exit(_interpreter_main())
