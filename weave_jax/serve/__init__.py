"""Serving: a paged KV cache, a step over flat token batches, sampling on device."""
from weave_jax.serve.sampling_params import SamplingParams
from weave_jax.serve.kv_cache import CACHE_SPEC, bytes_per_page
from weave_jax.serve.runner import ModelRunner, ScheduledChunk, StepResult
from weave_jax.serve.sampler import sample
from weave_jax.serve.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from weave_jax.serve.llm import LLM, RequestOutput, RequestMetrics, StreamDelta
