"""Prometheus metrics for `GET /metrics` (names follow vLLM's, under the `afm:` prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from afm.engine.llm_engine import LLMEngine, RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.requests = Counter("afm:requests", "Finished requests by status (stop, length, abort, error)",
                                labels + ["status"], registry=r)
        self.prompt_tokens = Counter("afm:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("afm:generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram("afm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("afm:time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("afm:e2e_request_latency_seconds", "Arrival to last token", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("afm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("afm:num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_usage = Gauge("afm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1)", labels,
                              registry=r)
        self.free_blocks = Gauge("afm:kv_cache_free_blocks", "Free KV-cache blocks", labels, registry=r)
        self.total_blocks = Gauge("afm:kv_cache_total_blocks", "Usable KV-cache blocks", labels, registry=r)
        self.prefix_hit_rate = Gauge("afm:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache",
                                     labels, registry=r)
        self.preemptions = Gauge("afm:num_preemptions", "Requests preempted since start", labels, registry=r)
        self.failed_steps = Counter("afm:engine_step_failures", "Engine steps that raised (their requests were "
                                    "ended with an error; the engine went on)", labels, registry=r)
        self.model_name = model_name
        self._last_prompt = 0
        self._last_generation = 0
        self._last_aborted = 0
        self._last_failed_steps = 0
        self._last_failed_requests = 0

    def observe_finished(self, out: RequestOutput) -> None:
        m = self.model_name
        for o in out.outputs:
            if o.finish_reason != "abort":  # aborts are counted by the engine (render)
                self.requests.labels(m, o.finish_reason or "error").inc()
        t = out.metrics
        if t.first_token_time is not None:
            self.ttft.labels(m).observe(t.first_token_time - t.arrival_time)
            if t.finished_time is not None:
                self.e2e.labels(m).observe(t.finished_time - t.arrival_time)
                longest = max(len(o.token_ids) for o in out.outputs)
                if longest > 1:
                    self.tpot.labels(m).observe((t.finished_time - t.first_token_time) / (longest - 1))

    def observe_error(self) -> None:
        self.requests.labels(self.model_name, "error").inc()

    def render(self, engine: LLMEngine) -> bytes:
        """Refresh the gauges from the engine (call under the engine lock) and render the text format."""
        m = self.model_name
        s = engine.stats()
        self.running.labels(m).set(s["num_running"])
        self.waiting.labels(m).set(s["num_waiting"])
        self.kv_usage.labels(m).set(s["kv_cache_usage"])
        self.free_blocks.labels(m).set(s["num_free_blocks"])
        self.total_blocks.labels(m).set(s["num_blocks"])
        self.prefix_hit_rate.labels(m).set(s["prefix_cache_hit_rate"])
        self.preemptions.labels(m).set(s["num_preemptions"])
        prompt, gen = int(s["prompt_tokens_total"]), int(s["generation_tokens_total"])
        self.prompt_tokens.labels(m).inc(prompt - self._last_prompt)
        self.generation_tokens.labels(m).inc(gen - self._last_generation)
        aborted = int(s["aborted_requests_total"])
        self.requests.labels(m, "abort").inc(aborted - self._last_aborted)
        failed_steps, failed_requests = int(s["failed_steps_total"]), int(s["failed_requests_total"])
        self.failed_steps.labels(m).inc(failed_steps - self._last_failed_steps)
        self.requests.labels(m, "error").inc(failed_requests - self._last_failed_requests)
        self._last_prompt, self._last_generation, self._last_aborted = prompt, gen, aborted
        self._last_failed_steps, self._last_failed_requests = failed_steps, failed_requests
        return generate_latest(self.registry)
