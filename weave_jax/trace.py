"""Capture and analyse jax.profiler traces: how much collective time is hidden.

TokenWeave only pays off if one half-batch's collectives run *beside* the other half's compute.
The compiled HLO shows what XLA intends; a profiler trace shows what ran (DESIGN.md, "Overlap in
XLA"). This module measures it, per step, per layer and per device:

    compute     = |union of non-collective device-op intervals|
    collective  = |union of collective device-op intervals|
    exposed     = |collective union minus compute union|   (same device, any stream)
    hidden      = 1 - exposed / collective
    in gaps     = the part of exposed that falls in idle stretches of <= SHORT_GAP_US between
                  two compute ops: launch gaps, which a model without communication has too --
                  or short waits for the collective itself, which the trace cannot tell apart.
                  So real exposure lies between (exposed - in gaps) and exposed.

Trace structure (Chrome/Perfetto JSON that jax writes as ``<run>/<host>.trace.json.gz``):

- GPU: one process per device named ``/device:GPU:N``; its threads are streams ``Stream #N(...)``.
  Kernel events carry args ``hlo_op``, ``hlo_module``, ``correlation_id`` and, when XLA annotated
  the launch, ``name``/``tf_op``/``long_name`` holding the op's scope path.
- CPU (``--xla_force_host_platform_device_count``): one process ``/host:CPU``; XLA ops run on host
  threads (``tf_XLAExecute/..``, ``tf_XLAEigen/..``) as events whose args carry ``hlo_op``,
  ``hlo_module`` and ``device_ordinal``. A thread serves different devices over time, so the
  device comes from ``device_ordinal``. These events carry no scope path: ``capture`` therefore
  writes ``hlo_ops.json`` beside the trace (op name -> opcode and ``op_name`` metadata from the
  compiled HLO), and ``analyze`` reads it for layer attribution and classification.
- Steps: host events named ``step`` with an ``args.step_num`` (``StepTraceAnnotation``).

CLI: ``python -m weave_jax.trace DIR_OR_FILE [--json] [--compare OTHER]``; ``--compare`` prints,
kernel by kernel, how much longer the kernels both traces ran took in the first (e.g. the woven
model's GEMMs against the same split without communication).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import re
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

SIDECAR = "hlo_ops.json"
TOP_OPS = 12  # rows of the table of op names by time per step
TRACE_GLOBS = ("*.trace.json.gz", "perfetto_trace.json.gz", "*.trace.json")
XPLANE_GLOB = "*.xplane.pb"
OTHER = "other"

# Collective classification: an op is a collective if any of these substrings occurs in its event
# name, its ``hlo_op``/``long_name`` arg or its HLO opcode, compared after lower-casing and mapping
# "_" to "-". Everything else on a device is compute. Scope paths (``tf_op``, ``name``) are NOT
# searched: a scope called e.g. "psum_block" must not turn its GEMMs into collectives.
COLLECTIVE_PATTERNS: dict[str, str] = {
    "all-reduce": "HLO all-reduce, all-reduce-start/-done",
    "all-gather": "HLO all-gather (+ -start/-done)",
    "reduce-scatter": "HLO reduce-scatter",
    "collective-permute": "HLO collective-permute (+ -start/-done)",
    "all-to-all": "HLO all-to-all",
    "allreduce": "NCCL kernel spellings: ncclDevKernel_AllReduce_*, ...",
    "allgather": "ncclDevKernel_AllGather_*",
    "reducescatter": "ncclDevKernel_ReduceScatter_*",
    "alltoall": "NCCL/XLA all-to-all spellings",
    "nccl": "any NCCL kernel (ncclDevKernel_*, ncclKernel_*)",
    "psum": "jax op names on CPU, e.g. psum_invariant.14",
    "ppermute": "jax.lax.ppermute op names",
    "collective": "XLA's own collective kernels and collective-broadcast",
    "reduce-add-norm-kernel": "weave_jax's kernels: fused_/ce_/oneshot_reduce_add_norm_kernel",
    "weave-fused": "weave_jax fused communication kernels",
    "memcpyp2p": "peer-to-peer copies (CUPTI 'MemcpyP2P'): the copy-engine algorithm's NVLink copies",
    "memcpy-p2p": "the same, other spelling",
}
LAYER_RE = re.compile(r"layer_(\d+)")
# Arg keys that may hold an op's scope path ("jit(forward)/.../layer_3/..."), most specific first.
SCOPE_KEYS = ("long_name", "tf_op", "name", "hlo_op")
# Threads of a /device: process that are derived summaries of the stream lines, not streams.
DEVICE_OP_LINES = ("XLA Ops", "Async XLA Ops")


def is_collective(*texts: str | None) -> bool:
  """Whether any text names a collective, by the ``COLLECTIVE_PATTERNS`` table.

  Args:
    texts: event name, ``hlo_op``, ``long_name``, HLO opcode; ``None`` entries are skipped.
  """
  for text in texts:
    if text:
      norm = text.lower().replace("_", "-")
      if any(p in norm for p in COLLECTIVE_PATTERNS):
        return True
  return False


# ----------------------------------------------------------------------------- interval math
Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
  """Merge intervals into sorted, disjoint ``(start, end)`` pairs (touching ones merge)."""
  out: list[list[float]] = []
  for start, end in sorted(intervals):
    if end <= start:
      continue
    if out and start <= out[-1][1]:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [(s, e) for s, e in out]


def measure(intervals: Iterable[Interval]) -> float:
  """Total length covered by ``intervals`` (overlaps counted once)."""
  return sum(e - s for s, e in union(intervals))


def intersect(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
  """Parts of ``union(a)`` covered by ``union(b)``."""
  a = union(a)
  return subtract(a, subtract(a, b))


def short_gaps(intervals: Iterable[Interval], max_us: float) -> list[Interval]:
  """Idle stretches of at most ``max_us`` between consecutive intervals of ``union(intervals)``."""
  u = union(intervals)
  return [(end, start) for (_, end), (start, _) in zip(u, u[1:]) if start - end <= max_us]


def subtract(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
  """Parts of ``union(a)`` not covered by ``union(b)``, as disjoint sorted intervals."""
  cut = union(b)
  out: list[Interval] = []
  for start, end in union(a):
    cur = start
    for bs, be in cut:
      if be <= cur or bs >= end:
        continue
      if bs > cur:
        out.append((cur, bs))
      cur = max(cur, be)
      if cur >= end:
        break
    if cur < end:
      out.append((cur, end))
  return out


@dataclasses.dataclass(frozen=True)
class Stats:
  """Overlap numbers for one (step, device[, layer]) or their mean, in microseconds."""

  compute_us: float = 0.0
  collective_us: float = 0.0
  exposed_us: float = 0.0
  exposed_in_gaps_us: float = 0.0  # of exposed_us: inside compute gaps <= SHORT_GAP_US

  @property
  def hidden_frac(self) -> float | None:
    """1 - exposed/collective; ``None`` when there is no collective time."""
    return None if self.collective_us <= 0 else 1.0 - self.exposed_us / self.collective_us

  def to_dict(self) -> dict[str, float | None]:
    return {"compute_ms": self.compute_us / 1e3, "collective_ms": self.collective_us / 1e3,
            "exposed_ms": self.exposed_us / 1e3,
            "exposed_in_gaps_ms": self.exposed_in_gaps_us / 1e3, "hidden_frac": self.hidden_frac}


STAT_FIELDS = tuple(f.name for f in dataclasses.fields(Stats))
# Compute-idle stretches up to this long count as launch gaps.  A judgment, not a measurement:
# back-to-back dependent kernels leave gaps of a few µs; a wait for a collective can be as short.
SHORT_GAP_US = 10.0


def overlap_stats(compute: Sequence[Interval], collective: Sequence[Interval],
                  all_compute: Sequence[Interval] | None = None) -> Stats:
  """Stats of one device's op intervals.

  Args:
    compute: compute-op intervals counted as this group's compute time.
    collective: collective-op intervals of this group.
    all_compute: compute that can hide the collectives (default ``compute``). For a layer this is
      all compute on the device, so layer i's collective hidden under layer i+1's GEMM counts.
  """
  hide = compute if all_compute is None else all_compute
  exposed = subtract(collective, hide)
  return Stats(measure(compute), measure(collective), measure(exposed),
               measure(intersect(exposed, short_gaps(hide, SHORT_GAP_US))))


def mean_stats(stats: Sequence[Stats], n: int | None = None) -> Stats:
  """Field-wise sum over ``stats`` divided by ``n`` (default: their number; empty -> zeros)."""
  n = max(len(stats), 1) if n is None else n
  return Stats(*(sum(getattr(s, f) for s in stats) / n for f in STAT_FIELDS))


# ----------------------------------------------------------------------------- trace loading
@dataclasses.dataclass(frozen=True)
class Op:
  """One device op/kernel execution."""

  device: str
  stream: str
  start: float  # us
  end: float  # us
  name: str
  collective: bool
  layer: str  # "layer_<i>" or OTHER


def find_trace(path: str | Path) -> Path:
  """Resolve a trace file: ``path`` itself, or the newest trace under the directory ``path``.

  JSON traces are preferred; an ``*.xplane.pb`` is returned only when no JSON trace exists.

  Args:
    path: a trace file, or a log dir as given to ``jax.profiler.trace`` (searched recursively).
  """
  path = Path(path)
  if path.is_file():
    return path
  if not path.is_dir():
    raise FileNotFoundError(f"trace: no such file or directory: {path}")
  for globs in (TRACE_GLOBS, (XPLANE_GLOB,)):
    found = [p for g in globs for p in path.rglob(g)]
    if found:
      return max(found, key=lambda p: (p.stat().st_mtime, p.name))
  raise FileNotFoundError(
      f"trace: no profiler trace ({', '.join(TRACE_GLOBS + (XPLANE_GLOB,))}) under {path}")


def load_events(path: Path) -> list[dict[str, Any]]:
  """Chrome-trace events of a ``.trace.json[.gz]`` file, or of an ``.xplane.pb`` via jax."""
  if path.name.endswith(".xplane.pb"):
    return _xplane_events(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  events = data.get("traceEvents", []) if isinstance(data, dict) else data
  return [e for e in events if isinstance(e, dict) and e]


def _xplane_events(path: Path) -> list[dict[str, Any]]:
  """Convert an XSpace (planes -> processes, lines -> threads) into Chrome-trace events."""
  from jax.profiler import ProfileData  # jax only needed for this fallback

  events: list[dict[str, Any]] = []
  with warnings.catch_warnings():  # jaxlib's stats iterator warns about its own type
    warnings.simplefilter("ignore", DeprecationWarning)
    for pid, plane in enumerate(ProfileData.from_file(str(path)).planes):
      _plane_events(pid, plane, events)
  return events


def _plane_events(pid: int, plane: Any, events: list[dict[str, Any]]) -> None:
  events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": plane.name}})
  for tid, line in enumerate(plane.lines):
    events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                   "args": {"name": line.name}})
    for ev in line.events:
      events.append({"ph": "X", "pid": pid, "tid": tid, "name": ev.name,
                     "ts": ev.start_ns / 1e3, "dur": ev.duration_ns / 1e3,
                     "args": {k: str(v) for k, v in ev.stats}})


def load_sidecar(trace: Path) -> dict[str, dict[str, dict[str, str]]]:
  """``{hlo_module: {hlo_op: {"opcode", "op_name"}}}`` beside ``trace``, or ``{}``.

  Looks for ``<name>.hlo_ops.json`` (``<name>`` = trace file name without ``.trace.json[.gz]``
  or ``.xplane.pb``; lets fixtures share a folder), then ``hlo_ops.json`` as ``capture`` writes.
  """
  stem = re.sub(r"(\.trace\.json(\.gz)?|\.xplane\.pb|\.json(\.gz)?)$", "", trace.name)
  for side in (trace.with_name(f"{stem}.{SIDECAR}"), trace.parent / SIDECAR):
    if side.is_file():
      return json.loads(side.read_text())
  return {}


def _names(events: list[dict[str, Any]]) -> tuple[dict[Any, str], dict[tuple, str]]:
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  return procs, threads


def _device_lines(procs: dict, threads: dict) -> set[tuple]:
  """(pid, tid) of the op lines of ``/device:`` processes: streams, else the XLA Ops lines."""
  keep: set[tuple] = set()
  for pid, pname in procs.items():
    if "/device:" not in pname:
      continue
    mine = {k: v for k, v in threads.items() if k[0] == pid}
    streams = {k for k, v in mine.items() if v.startswith("Stream")}
    keep |= streams or {k for k, v in mine.items() if v in DEVICE_OP_LINES}
  return keep


def _layer(args: dict[str, Any], name: str, meta: dict[str, str] | None) -> str:
  """``layer_<i>`` from the HLO op_name metadata, else from the scope args, else OTHER."""
  texts = ([meta.get("op_name", "")] if meta else []) + [str(args.get(k, "")) for k in SCOPE_KEYS]
  for text in texts + [name]:
    m = LAYER_RE.search(text)
    if m:
      return f"layer_{m.group(1)}"
  return OTHER


def _hlo_meta(sidecar: dict, args: dict[str, Any]) -> dict[str, str] | None:
  op = args.get("hlo_op")
  if not op or not sidecar:
    return None
  module = str(args.get("hlo_module", ""))
  if module in sidecar:  # names are unique only within a module
    return sidecar[module].get(op)
  return next((m[op] for m in sidecar.values() if op in m), None)


def device_ops(events: list[dict[str, Any]], sidecar: dict | None = None) -> list[Op]:
  """Device op executions of a trace, classified and attributed to layers.

  Args:
    events: Chrome-trace events (``load_events``).
    sidecar: ``load_sidecar`` output, used for opcode and scope lookup by ``hlo_op``.
  """
  procs, threads = _names(events)
  lines = _device_lines(procs, threads)
  ops = []
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    key, args = (e.get("pid"), e.get("tid")), e.get("args") or {}
    if key in lines:
      device = procs[key[0]]
    elif "hlo_op" in args and "device_ordinal" in args:  # CPU: ops on host threads
      device = f"/device:CPU:{args['device_ordinal']}"
    else:
      continue
    name, meta = str(e.get("name", "")), _hlo_meta(sidecar or {}, args)
    coll = is_collective(name, args.get("hlo_op"), args.get("long_name"),
                         meta and meta.get("opcode"))
    start = float(e["ts"])
    ops.append(Op(device, threads.get(key, str(key[1])), start, start + float(e["dur"]),
                  name, coll, _layer(args, name, meta)))
  return ops


def step_windows(events: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
  """``(step_num, start_us, end_us)`` of the host ``step`` annotations, sorted by start."""
  out = []
  for e in events:
    args = e.get("args") or {}
    if e.get("ph") == "X" and e.get("name") == "step" and "step_num" in args:
      out.append((int(args["step_num"]), float(e["ts"]), float(e["ts"]) + float(e["dur"])))
  return sorted(out, key=lambda w: w[1])


def step_ops(ops: Sequence[Op], windows: Sequence[tuple[int, float, float]]
             ) -> list[tuple[int, list[Op]]]:
  """``(step, its ops)`` per window; an op belongs to the window its start falls in."""
  return [(step, [o for o in ops if t0 <= o.start < t1]) for step, t0, t1 in windows]


def device_span_ms(fn: Callable, *args: Any, steps: int = 3) -> float | None:
  """Median over ``steps`` traced calls of ``fn(*args)`` of the device span: from the call's
  first device op's start to its last one's end, in ms; None where the trace shows no device
  op.  Unlike a wall time it leaves out the call's dispatch and the host's wait for it (what
  device events around the region would measure)."""
  with tempfile.TemporaryDirectory() as logdir:
    events = load_events(capture(fn, *args, logdir=logdir, steps=steps, hlo_table=False))
  spans = [(max(o.end for o in mine) - min(o.start for o in mine)) / 1e3
           for _, mine in step_ops(device_ops(events), step_windows(events)) if mine]
  return statistics.median(spans) if spans else None


# ----------------------------------------------------------------------------- analysis
@dataclasses.dataclass(frozen=True)
class TopOp:
  """One op name's device time per step on one device."""

  name: str
  calls: float     # executions per step
  total_us: float  # per step
  mean_us: float   # per execution
  collective: bool


def op_times(ops: Sequence[Op], windows: Sequence[tuple[int, float, float]],
             device: str) -> list[TopOp]:
  """Every op name's time per step on ``device`` (ops assigned to steps by start time, as in
  ``analyze_ops``), most time first: where a step's time goes, kernel by kernel."""
  mine = [o for o in ops if o.device == device
          and any(t0 <= o.start < t1 for _, t0, t1 in windows)]
  by_name: dict[str, list[Op]] = defaultdict(list)
  for o in mine:
    by_name[o.name].append(o)
  steps = max(len(windows), 1)
  rows = [TopOp(name, len(v) / steps, sum(o.end - o.start for o in v) / steps,
                sum(o.end - o.start for o in v) / len(v), v[0].collective)
          for name, v in by_name.items()]
  return sorted(rows, key=lambda t: -t.total_us)


@dataclasses.dataclass(frozen=True)
class OpDelta:
  """One kernel name in two traces (e.g. the woven model and the same split without
  communication): how much longer each execution ran in ``a``, and what that cost per step."""

  name: str
  calls_a: float
  calls_b: float
  mean_a_us: float
  mean_b_us: float

  @property
  def extra_us(self) -> float:
    """Per step: a's executions at a's mean minus at b's (only the slow-down, not the count)."""
    return self.calls_a * (self.mean_a_us - self.mean_b_us)


def compare_ops(a: Sequence[TopOp], b: Sequence[TopOp]) -> list[OpDelta]:
  """The kernel names (not collectives) both traces ran, largest per-step slow-down in ``a``
  first.  Kernel names such as cuBLAS's ``nvjet_*`` are the same in two programs that run the
  same GEMM shapes; XLA fusion names are numbered per program and rarely match."""
  bb = {t.name: t for t in b if not t.collective}
  rows = [OpDelta(t.name, t.calls, bb[t.name].calls, t.mean_us, bb[t.name].mean_us)
          for t in a if not t.collective and t.name in bb]
  return sorted(rows, key=lambda d: -abs(d.extra_us))


@dataclasses.dataclass
class StepReport:
  step: int
  start_us: float
  dur_us: float
  per_device: dict[str, Stats]
  mean: Stats


@dataclasses.dataclass
class Report:
  """Result of ``analyze``: per-step and per-layer overlap, device and stream inventory."""

  path: str
  devices: list[str]
  streams: dict[str, list[str]]
  steps: list[StepReport]
  layers: dict[str, Stats]  # mean over steps x devices
  layer_source: str  # where layer scopes came from: "hlo sidecar", "trace args" or "none"
  ops: list[TopOp] = dataclasses.field(default_factory=list)  # first device, most time first

  @property
  def top(self) -> list[TopOp]:
    """The op names with the most time per step (first device): the table's rows."""
    return self.ops[:TOP_OPS]

  def to_dict(self) -> dict[str, Any]:
    return {
        "path": self.path, "devices": self.devices, "streams": self.streams,
        "layer_source": self.layer_source,
        "steps": [{"step": s.step, "start_us": s.start_us, "dur_ms": s.dur_us / 1e3,
                   "mean": s.mean.to_dict(),
                   "per_device": {d: v.to_dict() for d, v in s.per_device.items()}}
                  for s in self.steps],
        "layers": {k: v.to_dict() for k, v in self.layers.items()},
        "top": [dataclasses.asdict(t) for t in self.top],
    }


def _layer_key(name: str) -> tuple[int, int]:
  m = LAYER_RE.fullmatch(name)
  return (0, int(m.group(1))) if m else (1, 0)


def analyze_ops(ops: Sequence[Op], windows: Sequence[tuple[int, float, float]],
                path: str = "", layer_source: str = "trace args") -> Report:
  """Build a ``Report`` from classified ops and step windows.

  Args:
    ops: device ops (``device_ops``).
    windows: ``(step, start, end)``; ops are assigned by start time. Empty: one step spanning
      all ops.
    path: trace path, for the report.
    layer_source: how layers were attributed, for the report.
  """
  if not windows and ops:
    windows = [(0, min(o.start for o in ops), max(o.end for o in ops))]
  devices = sorted({o.device for o in ops})
  streams = {d: sorted({o.stream for o in ops if o.device == d}) for d in devices}
  steps, layer_rows = [], defaultdict(list)
  for (step, t0, t1), (_, in_step) in zip(windows, step_ops(ops, windows)):
    per_dev = {}
    for d in devices:
      mine = [o for o in in_step if o.device == d]
      comp = [(o.start, o.end) for o in mine if not o.collective]
      per_dev[d] = overlap_stats(comp, [(o.start, o.end) for o in mine if o.collective])
      for layer in {o.layer for o in mine}:
        lops = [o for o in mine if o.layer == layer]
        layer_rows[layer].append(overlap_stats(
            [(o.start, o.end) for o in lops if not o.collective],
            [(o.start, o.end) for o in lops if o.collective], comp))
    steps.append(StepReport(step, t0, t1 - t0, per_dev, mean_stats(list(per_dev.values()))))
  n = max(len(windows) * len(devices), 1)  # a layer absent from a (step, device) counts as 0
  layers = {k: mean_stats(rows, n)
            for k, rows in sorted(layer_rows.items(), key=lambda kv: _layer_key(kv[0]))}
  times = op_times(ops, windows, devices[0]) if devices else []
  return Report(path, devices, streams, steps, layers, layer_source, times)


def analyze(path: str | Path) -> Report:
  """Analyse a trace file or the newest trace under a log dir.

  Args:
    path: ``*.trace.json.gz`` / ``*.trace.json`` / ``*.xplane.pb``, or a directory holding one.

  Raises:
    FileNotFoundError: naming ``path`` when it holds no trace.
    ValueError: when the trace holds no device ops.
  """
  trace = find_trace(path)
  events, sidecar = load_events(trace), load_sidecar(trace)
  ops = device_ops(events, sidecar)
  if not ops:
    raise ValueError(f"trace: no device ops (GPU streams or CPU hlo_op events) in {trace}")
  attributed = any(o.layer != OTHER for o in ops)
  source = ("hlo sidecar" if sidecar else "trace args") if attributed else "none"
  return analyze_ops(ops, step_windows(events), str(trace), source)


# ----------------------------------------------------------------------------- capture
def _hlo_table(hlo_text: str) -> dict[str, dict[str, dict[str, str]]]:
  """``{module: {instruction: {"opcode", "op_name"}}}`` from compiled HLO text."""
  table: dict[str, dict[str, dict[str, str]]] = {}
  module = ""
  inst_re = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(")
  for line in hlo_text.splitlines():
    if line.startswith("HloModule "):
      module = line.split()[1].rstrip(",")
      table.setdefault(module, {})
    elif m := inst_re.match(line):
      op_name = re.search(r'op_name="([^"]*)"', line)
      table.setdefault(module, {})[m.group(1)] = {
          "opcode": m.group(2), "op_name": op_name.group(1) if op_name else ""}
  return table


def capture(fn: Callable, *args: Any, logdir: str | Path, steps: int = 3,
            warmup: int = 1, hlo_table: bool = True) -> Path:
  """Run ``fn(*args)`` under ``jax.profiler.trace`` and return the trace file path.

  Each traced call is wrapped in ``StepTraceAnnotation("step", step_num=i)`` and blocked on, so
  its device work lies inside the step window. The compiled HLO's op table is written as
  ``hlo_ops.json`` beside the trace when ``fn`` is a compiled executable (``.as_text``) or a
  ``jax.jit`` function (``.lower``).

  Args:
    fn: the jitted callable or compiled executable.
    args: its positional arguments.
    logdir: directory for ``jax.profiler.trace``; the trace lands in ``plugins/profile/<run>/``.
    steps: traced calls.
    warmup: untraced calls first (compilation, autotuning).
    hlo_table: write the op table (for a ``jax.jit`` function that compiles ``fn`` once more).
  """
  import jax

  if steps < 1 or warmup < 0:
    raise ValueError(f"capture: need steps >= 1 and warmup >= 0, got {steps=}, {warmup=}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  with jax.profiler.trace(str(logdir)):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("step", step_num=i):
        jax.block_until_ready(fn(*args))
  trace = find_trace(logdir)
  if not hlo_table:
    return trace
  if hasattr(fn, "as_text"):                    # jax.stages.Compiled
    hlo_text = fn.as_text()
  elif hasattr(fn, "lower"):                    # jax.jit function
    hlo_text = fn.lower(*args).compile().as_text()
  else:
    hlo_text = None
    warnings.warn(f"capture: {fn!r} is neither compiled nor jitted; no {SIDECAR} written, so "
                  "CPU traces will attribute every op to 'other'", stacklevel=2)
  if hlo_text is not None:
    (trace.parent / SIDECAR).write_text(json.dumps(_hlo_table(hlo_text)))
  return trace


# ----------------------------------------------------------------------------- output
def _fmt(v: float | None, pct: bool = False) -> str:
  if v is None:
    return "-"
  return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def format_table(report: Report) -> str:
  """Human-readable tables: per step (device mean), per layer (mean over steps), streams."""
  head = "{:>12} {:>11} {:>9} {:>11} {:>11} {:>7}".format
  cols = ("compute ms", "coll ms", "exposed ms", "in gaps ms", "hidden")

  def row(label: str, s: Stats) -> str:
    return (f"{label:>12} {_fmt(s.compute_us / 1e3):>11} {_fmt(s.collective_us / 1e3):>9} "
            f"{_fmt(s.exposed_us / 1e3):>11} {_fmt(s.exposed_in_gaps_us / 1e3):>11} "
            f"{_fmt(s.hidden_frac, pct=True):>7}")

  out = [f"trace: {report.path}", f"devices: {len(report.devices)} "
         f"({', '.join(report.devices)}); layer scopes from: {report.layer_source}", "",
         "per step (mean over devices)", head("step", *cols)]
  out += [row(str(s.step), s.mean) for s in report.steps]
  out += ["", "per layer (mean over steps and devices)", head("layer", *cols)]
  out += [row(k, v) for k, v in report.layers.items()]
  out += ["", "streams"] + [f"  {d}: {', '.join(s)}" for d, s in report.streams.items()]
  if report.top:
    out += ["", f"top ops by time per step ({report.devices[0]}; * = collective)",
            "{:>10} {:>8} {:>9}  {}".format("total ms", "calls", "mean us", "name")]
    out += ["{:>10.3f} {:>8.1f} {:>9.1f}  {}{}".format(t.total_us / 1e3, t.calls, t.mean_us,
                                                       "* " if t.collective else "", t.name[:90])
            for t in report.top]
  return "\n".join(out)


def format_compare(a: Report, b: Report, n: int = 15) -> str:
  """Kernel by kernel, what trace ``a`` spent per step beyond trace ``b`` (first devices):
  the shared kernels' slow-down, and the time of the kernels only one of them ran."""
  deltas = compare_ops(a.ops, b.ops)
  shared = {d.name for d in deltas}
  only_a = sum(t.total_us for t in a.ops if t.name not in shared)
  only_b = sum(t.total_us for t in b.ops if t.name not in shared)
  out = [f"A: {a.path}", f"B: {b.path}",
         "kernels run by both (first device), largest slow-down in A first; per step",
         "{:>8} {:>8} {:>10} {:>10} {:>7} {:>10}  {}".format(
             "calls A", "calls B", "mean A us", "mean B us", "A/B", "extra ms", "name")]
  out += ["{:>8.1f} {:>8.1f} {:>10.1f} {:>10.1f} {:>7.3f} {:>10.3f}  {}".format(
      d.calls_a, d.calls_b, d.mean_a_us, d.mean_b_us,
      d.mean_a_us / d.mean_b_us if d.mean_b_us else float("nan"), d.extra_us / 1e3, d.name[:80])
      for d in deltas[:n]]
  out += [f"shared kernels' slow-down in A: {sum(d.extra_us for d in deltas) / 1e3:.3f} ms per "
          "step",
          f"time in kernels only A ran: {only_a / 1e3:.3f} ms per step; only B ran: "
          f"{only_b / 1e3:.3f} ms (collectives, copies, side kernels, and fusions whose names "
          "differ between programs)"]
  return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: ``python -m weave_jax.trace DIR_OR_FILE [--json] [--compare OTHER]``."""
  parser = argparse.ArgumentParser(prog="python -m weave_jax.trace", description=__doc__.split(
      "\n")[0])
  parser.add_argument("path", help="trace file, or a jax.profiler log dir (newest trace used)")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--compare", metavar="OTHER", default=None,
                      help="a second trace: print, kernel by kernel, how much longer the shared "
                           "kernels ran in PATH than in OTHER (e.g. the woven model against "
                           "nocomm+weave)")
  ns = parser.parse_args(argv)
  try:
    report = analyze(ns.path)
    other = analyze(ns.compare) if ns.compare else None
  except (FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if other is not None:
    print(format_compare(report, other))
    return 0
  print(json.dumps(report.to_dict(), indent=1) if ns.json else format_table(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
