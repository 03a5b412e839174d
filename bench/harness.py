"""The shared benchmark harness: one timing policy, the result-row model, same-run ratios, progress.

Timing policy (DESIGN.md "Benchmarks"), never a hand-written loop:

* CPU: ``torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)``, median of the blocks,
  with ``num_threads = torch.get_num_threads()`` (Timer's default is ONE thread, which would time every
  multi-threaded kernel single-threaded);
* CUDA: ``triton.testing.do_bench`` (CUDA events, device synchronisation, L2 flushed between runs),
  median; without Triton, the same Timer, which synchronises CUDA around each block.

Every function is called once before timing (lazy initialisation, first allocation, JIT compiles are
not timed; callers that compile report the compile time separately).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch


@dataclass(frozen=True)
class Timing:
    """Median time of one call, its interquartile range, and how it was measured."""

    median_s: float
    iqr_s: float
    samples: int  # number of blocks (CPU) or timed calls (CUDA) the median is taken over
    method: str


def time_cpu(fn: Callable[[], object], min_run_time: float) -> Timing:
    from torch.utils import benchmark

    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median, m.iqr, len(m.times), f"Timer.blocked_autorange x{m.number_per_run}/block")


def time_cuda(fn: Callable[[], object], min_run_time: float) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:  # Timer synchronises CUDA before reading the clock
        from torch.utils import benchmark

        fn()
        torch.cuda.synchronize()
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
        return Timing(m.median, m.iqr, len(m.times), "Timer.blocked_autorange (no triton)")
    rep_ms = max(20, int(min_run_time * 1000))
    q50, q25, q75 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
    return Timing(q50 * 1e-3, (q75 - q25) * 1e-3, -1, f"triton.testing.do_bench rep={rep_ms}ms")


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float) -> Timing:
    """Median seconds per call of ``fn`` on ``device`` (see the module docstring for the policy)."""
    if device.type == "cuda":
        return time_cuda(fn, min_run_time)
    if device.type == "cpu":
        return time_cpu(fn, min_run_time)
    raise ValueError(f"no timing policy for device type {device.type!r}")


@dataclass
class Row:
    """One measurement: ``impl`` running ``op`` on one (case, inputs, size, dtype).

    ``ratios[peer]`` = peer's median / this row's median for peers measured in the same run and group
    (so > 1 means this row is faster than that peer; against a copy of the same bytes it is the
    fraction of the copy bandwidth this row reaches). ``accuracy``: normwise relative error against the
    float64 reference, or None where it does not apply. ``error``: why the measurement failed.
    """

    op: str
    case: str
    inputs: str
    size: int
    dtype: str
    impl: str
    device: str
    median_s: float | None = None
    iqr_s: float | None = None
    samples: int = 0
    bytes: int | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float | None:
        if self.bytes is None or not self.median_s:
            return None
        return self.bytes / self.median_s / 1e9

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gbps"] = self.gbps
        return d


@dataclass
class Report:
    """What one op family's benchmark returns to the runner.

    ``subjects``: the implementations under test (their GB/s, ratios and accuracy get columns);
    ``peers``: the implementations they are compared with (one ratio column each); ``ceiling``: the
    peer that moves the same bytes as fast as the machine can (shown as "% of <ceiling>").
    """

    op: str
    title: str
    rows: list[Row]
    subjects: list[str]
    peers: list[str]
    ceiling: str | None = None
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    # keys of Row.extra shown as one column per subject (e.g. a memory figure), in this order
    extra_columns: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What the runner hands each op family's ``run``: mode, device, options, the timing policy."""

    mode: str  # "quick" or "full"
    device: torch.device
    min_run_time: float
    args: argparse.Namespace
    sizes: list[int] | None = None  # --sizes override (element counts)
    dtypes: list[torch.dtype] | None = None  # --dtypes override
    progress: bool = True

    rounds: int = 1  # CPU: interleaved rounds per measure_many (see there)

    def time(self, fn: Callable[[], object]) -> Timing:
        return time_fn(fn, self.device, self.min_run_time)

    def measure(self, fn: Callable[[], object], **row_fields) -> Row:
        """Times one ``fn`` into a Row (``impl`` among the fields); see ``measure_many``."""
        impl = row_fields.pop("impl")
        nbytes = row_fields.pop("bytes", None)
        return self.measure_many({impl: fn}, {impl: nbytes}, **row_fields)[impl]

    def measure_many(self, fns: dict[str, Callable[[], object]], nbytes: dict[str, int | None] | None = None,
                     **common) -> dict[str, Row]:
        """Times every implementation of one case into Rows (``common``: op, case, inputs, size, dtype).

        On CPU the implementations are interleaved: ``rounds`` rounds, each running every
        implementation's ``blocked_autorange(min_run_time / rounds)`` in a rotated order, and each median
        is taken over all of its blocks (``Measurement.merge``). On a shared machine whose load changes
        during the run, every implementation then sees the same conditions, so their ratios hold even
        when absolute times drift. On CUDA, one ``do_bench`` each. A failure (e.g. out of memory)
        becomes the row's ``error`` and the others go on.
        """
        nbytes = nbytes or {}
        rows = {name: Row(device=str(self.device), impl=name, bytes=nbytes.get(name), **common) for name in fns}

        def fail(name: str, exc: Exception) -> None:
            msg = str(exc).splitlines()[0] if str(exc) else ""
            rows[name].error = f"{type(exc).__name__}: {msg}"[:300]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        if self.device.type != "cpu" or self.rounds <= 1:
            for name, fn in fns.items():
                try:
                    t = self.time(fn)
                except Exception as exc:  # noqa: BLE001 - a failed peer must not end the sweep
                    fail(name, exc)
                    continue
                r = rows[name]
                r.median_s, r.iqr_s, r.samples, r.extra["method"] = t.median_s, t.iqr_s, t.samples, t.method
            return rows

        from torch.utils import benchmark

        timers = {}
        for name, fn in fns.items():
            try:
                fn()  # warm-up, and fail early
            except Exception as exc:  # noqa: BLE001
                fail(name, exc)
                continue
            timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        parts: dict[str, list] = {name: [] for name in timers}
        names = list(timers)
        per_round = self.min_run_time / self.rounds
        for k in range(self.rounds):
            shift = k % max(1, len(names))
            for name in names[shift:] + names[:shift]:  # rotate: no implementation always runs first
                if rows[name].error is None:
                    try:
                        parts[name].append(timers[name].blocked_autorange(min_run_time=per_round))
                    except Exception as exc:  # noqa: BLE001
                        fail(name, exc)
        for name in names:
            if rows[name].error is None:
                m = benchmark.Measurement.merge(parts[name])[0]
                r = rows[name]
                r.median_s, r.iqr_s, r.samples = m.median, m.iqr, len(m.times)
                r.extra["method"] = f"Timer.blocked_autorange, {self.rounds} interleaved rounds"
        return rows

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, unit="case", dynamic_ncols=True)


GROUP = ("op", "case", "inputs", "size", "dtype", "device")


def add_ratios(rows: Sequence[Row], peers: Iterable[str], group: Sequence[str] = GROUP,
               peer_group: dict[str, Sequence[str]] | None = None) -> None:
    """Fills ``row.ratios[peer] = peer.median_s / row.median_s`` for every row and named peer.

    Rows match their peer when they agree on the ``group`` fields; ``peer_group`` narrows that for
    peers shared across cases (e.g. a copy measured once per size and dtype: ``("op", "size", "dtype",
    "device")``).
    """
    peer_group = peer_group or {}
    index: dict[tuple, Row] = {}
    for r in rows:
        if r.median_s:
            index[(r.impl, *(getattr(r, f) for f in peer_group.get(r.impl, group)))] = r
    for r in rows:
        if not r.median_s:
            continue
        for p in peers:
            if p == r.impl:
                continue
            peer = index.get((p, *(getattr(r, f) for f in peer_group.get(p, group))))
            if peer is not None:
                r.ratios[p] = peer.median_s / r.median_s


def parse_sizes(text: str) -> list[int]:
    """"16,20,22" -> [2^16, 2^20, 2^22]; "10-26" -> every power 2^10..2^26; "10-26/2" every other one."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if "/" in part:
            part, s = part.split("/")
            step = int(s)
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-"))
            out += [2 ** e for e in range(lo, hi + 1, step)]
        else:
            out.append(2 ** int(part))
    if not out or any(e <= 0 for e in out):
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: expected powers of two such as 16,20,22 or 10-26/2")
    return sorted(set(out))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


def parse_dtypes(text: str) -> list[torch.dtype]:
    try:
        return [DTYPES[t.strip()] for t in text.split(",") if t.strip()]
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"--dtypes: unknown dtype {exc.args[0]!r}; expected {sorted(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def log2_size(n: int) -> str:
    e = math.log2(n) if n > 0 else float("nan")
    return f"2^{int(e)}" if e == int(e) else str(n)
