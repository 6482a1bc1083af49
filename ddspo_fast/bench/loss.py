"""Loss kernel benchmark: every backend against the script-form eager loss and its
torch.compile, in the same run, interleaved.

    ddspo-fast bench loss [--device cpu|cuda] [--dtypes fp32,bf16] [--shapes ...] [--layouts both]
    python benchmarks/bench_loss.py ...

Columns, per latent shape, dtype, layout and pass (fwd, bwd, fwd+bwd):

* ``eager``: the loss as the training scripts write it out (bench/script_loss.py, the
  block the README's drop-in replaces), independent of the library; ``compile``: that
  same function under torch.compile; ``torch``: the library's plain-PyTorch backend;
  then every compiled backend available here (``cpu``, ``triton``, ``cuda``).
* time quantiles p20/p50/p80 over the timed calls, the calls of all columns taken in
  alternating rounds (A B C, C B A, ...) so machine load hits them alike; before every
  timed call a buffer twice the last-level cache is overwritten (inputs come from memory);
* GB/s: the bytes a pass must move, counted term by term (`pass_bytes`), / p50, and that
  as a fraction of the device's measured copy bandwidth;
* speed-ups over eager and compile (p50 / p50);
* ``host_us`` (fwd+bwd rows): the host overhead of one call, defined as the mean wall
  time of back-to-back fwd+bwd calls on minimal inputs (2 rows of 16 elements; packed: 2
  + 3 rows), with one device sync after the whole loop: the kernels have nothing to do,
  so this is the Python, dispatch, checks and autograd cost a training step pays per
  call whatever the latent size;
* on a GPU also fwd+bwd replayed from a CUDA graph (kernel time without host overhead).

Results go to a JSON file (device, command, torch and ddspo_fast versions, thread count)
and, when matplotlib is installed, a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import ddspo_fast as df
from ddspo_fast.loss.dispatch import BACKENDS, unavailable_reasons

from .device import device_name, quantiles, sig, slug, sync
from .script_loss import script_loss, script_loss_from_reference

# (2B, C, H, W) latents of one SD-style training batch of B = 8 pairs.
SHAPES = {
    "sd15": (16, 4, 64, 64),
    "sdxl": (16, 4, 128, 128),
    "sd3": (16, 16, 128, 128),
    "sana": (16, 32, 32, 32),
}
DEFAULT_SHAPES = tuple(SHAPES)
SHAPES["tiny"] = (4, 4, 8, 8)  # for the benchmark's own test, not in the default set
HOST_SHAPE = (2, 1, 4, 4)      # minimal rows for the host-overhead column
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BETA = 5000.0
ROUNDS = 5


def _timed_call(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(cases: Dict[str, tuple], device: torch.device, *, min_iters: int = 10,
                     min_seconds: float = 0.4, warmup: int = 3, max_iters: int = 200) -> Dict[str, list]:
    """Milliseconds of each case's ``fn()``, ``setup()`` run untimed before each call.

    cases: name -> (fn, setup or None). The calls are taken in ROUNDS rounds, the order
    reversed every round, until each case has min_iters samples and the cases together
    have run min_seconds (per case) or max_iters is reached.
    """
    for fn, setup in cases.values():
        for _ in range(warmup):
            if setup:
                setup()
            fn()
    sync(device)
    samples: Dict[str, list] = {k: [] for k in cases}
    names = list(cases)
    start = time.perf_counter()
    r = 0
    while True:
        n = min(samples[names[0]].__len__(), max_iters)
        done = n >= min_iters and time.perf_counter() - start >= min_seconds * len(names)
        if done or n >= max_iters:
            break
        per_round = max(1, min_iters // ROUNDS)
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, setup = cases[name]
            for _ in range(per_round):
                if setup:
                    setup()
                samples[name].append(_timed_call(fn, device))
        r += 1
    return samples


def copy_gbps(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Device copy bandwidth: bytes read plus bytes written per second (p50)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = quantiles(time_interleaved({"copy": (lambda: dst.copy_(src), None)}, device,
                                    min_seconds=0.3)["copy"])["p50"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def pass_bytes(shape, dtype: torch.dtype, layout: str, which: str) -> int:
    """Minimum bytes a pass moves: every input element read once, the gradient written once.

    fwd reads model_pred, the reference rows and the target rows (standard: 3 x (2B, S);
    packed TF-CPP: model_pred (2B, S) + ref_out (3B, S)); bwd reads model_pred and the
    target rows and writes the gradient (3 x (2B, S)). Per-row outputs are negligible.
    """
    numel = 1
    for s in shape:
        numel *= s
    es = torch.empty((), dtype=dtype).element_size()
    fwd = (3.0 if layout == "standard" else 2.5) * numel * es
    bwd = 3.0 * numel * es
    return int({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[which])


def make_inputs(shape, dtype, device, layout: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = shape[0]
    mk = lambda r: torch.randn((r,) + tuple(shape[1:]), generator=g).to(device=device, dtype=dtype)  # noqa: E731
    model = mk(rows).requires_grad_(True)
    if layout == "packed":
        return model, (mk(3 * rows // 2),)
    return model, (mk(rows), mk(rows))


def loss_fn(layout: str, backend: str) -> Callable:
    """backend "eager": the script form (independent of the library); else a library backend."""
    if backend == "eager":
        if layout == "packed":
            return lambda m, refs: script_loss_from_reference(m, refs[0], BETA)[0]
        return lambda m, refs: script_loss(m, refs[0], refs[1], BETA)[0]
    if layout == "packed":
        return lambda m, refs: df.ddspo_loss_from_reference(m, refs[0], BETA, backend=backend)[0]
    return lambda m, refs: df.ddspo_loss(m, refs[0], refs[1], BETA, backend=backend)[0]


def cache_bytes(device: torch.device) -> int:
    """Last-level cache to defeat: GPU L2 as torch reports it, else a generous CPU L3."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    return 64 << 20


def bench_passes(fns: Dict[str, Callable], model, refs, device) -> Dict[str, Dict[str, list]]:
    """{column: {pass: samples ms}} for fwd, bwd and fwd+bwd, the columns interleaved.
    Before each timed call a buffer twice the last-level cache is overwritten."""
    flush = torch.empty(2 * cache_bytes(device) // 4, dtype=torch.float32, device=device)
    state: Dict[str, torch.Tensor] = {}
    out: Dict[str, Dict[str, list]] = {k: {} for k in fns}

    def fresh(name=None):
        model.grad = None
        if name is not None:
            state[name] = fns[name](model, refs)
        flush.zero_()

    passes = {
        "fwd": lambda k: (lambda: state.__setitem__(k, fns[k](model, refs)), fresh),
        "bwd": lambda k: (lambda: state[k].backward(), lambda: fresh(k)),
        "fwd+bwd": lambda k: (lambda: fns[k](model, refs).backward(), fresh),
    }
    for p, make in passes.items():
        samples = time_interleaved({k: make(k) for k in fns}, device)
        for k, s in samples.items():
            out[k][p] = s
    state.clear()
    model.grad = None
    return out


def host_overhead_us(fns: Dict[str, Callable], dtype, device, layout: str,
                     calls: int = 200) -> Dict[str, float]:
    """Mean microseconds per fwd+bwd call on minimal inputs (see the module doc), the
    columns interleaved in rounds, one device sync per round."""
    model, refs = make_inputs(HOST_SHAPE, dtype, device, layout, seed=1)
    for fn in fns.values():
        for _ in range(5):
            model.grad = None
            fn(model, refs).backward()
    sync(device)
    total = {k: 0.0 for k in fns}
    names = list(fns)
    per = max(1, calls // ROUNDS)
    for r in range(ROUNDS):
        for k in (names if r % 2 == 0 else names[::-1]):
            fn = fns[k]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per):
                model.grad = None
                fn(model, refs).backward()
            sync(device)
            total[k] += time.perf_counter() - t0
    model.grad = None
    return {k: v / (per * ROUNDS) * 1e6 for k, v in total.items()}


def graph_fwd_bwd(fn: Callable, model, refs, device) -> Optional[list]:
    """fwd+bwd replayed from a CUDA graph: kernel time without Python launch overhead.
    None when capture is impossible (CPU, or a backend that syncs with the host)."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up allocator and autotuners off the capture
                model.grad = None
                fn(model, refs).backward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        model.grad = None
        with torch.cuda.graph(graph):
            fn(model, refs).backward()
        flush = torch.empty(2 * cache_bytes(device) // 4, dtype=torch.float32, device=device)
        return time_interleaved({"graph": (graph.replay, flush.zero_)}, device)["graph"]
    except RuntimeError as exc:  # capture refused: recorded, not fatal
        print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    finally:
        model.grad = None


def run(device: torch.device, shapes: List[str], dtypes: List[str], backends: List[str],
        layouts: List[str], log=print) -> dict:
    copy = copy_gbps(device)
    log(f"device: {device_name(device)}   torch {torch.__version__}   copy bandwidth "
        f"{copy:.1f} GB/s")
    rows = []
    for layout in layouts:
        for dt_name in dtypes:
            dtype = DTYPES[dt_name]
            torch._dynamo.reset()
            # static shapes: each shape gets its own specialised graph, as in a training run
            fns = {"eager": loss_fn(layout, "eager"),
                   "compile": torch.compile(loss_fn(layout, "eager"), fullgraph=True,
                                            dynamic=False)}
            for bk in backends:
                if not unavailable_reasons(bk, device, dtype):
                    fns[bk] = loss_fn(layout, bk)
            host = host_overhead_us(fns, dtype, device, layout)
            for shape_name in shapes:
                shape = SHAPES[shape_name]
                model, refs = make_inputs(shape, dtype, device, layout)
                timings = bench_passes(fns, model, refs, device)
                for bk, f in fns.items():
                    g = graph_fwd_bwd(f, model, refs, device)
                    if g is not None:
                        timings[bk]["fwd+bwd (graph)"] = g
                p50 = {bk: {p: quantiles(s)["p50"] for p, s in per.items()}
                       for bk, per in timings.items()}
                new = []
                for bk, per_pass in timings.items():
                    for p, s in per_pass.items():
                        q = quantiles(s)
                        ms = q["p50"]
                        gbps = pass_bytes(shape, dtype, layout, p.split(" ")[0]) / (ms * 1e-3) / 1e9
                        base = lambda ref: p50[ref].get(p)  # noqa: E731
                        new.append({
                            "backend": bk, "dtype": dt_name, "shape": list(shape),
                            "layout": layout, "pass": p, "ms": sig(ms),
                            "ms_p20": sig(q["p20"]), "ms_p80": sig(q["p80"]),
                            "samples": len(s), "gbps": sig(gbps),
                            "fraction_of_copy": sig(gbps / copy),
                            "vs_eager": sig(base("eager") / ms) if base("eager") else None,
                            "vs_compile": sig(base("compile") / ms) if base("compile") else None,
                            "host_us": sig(host[bk]) if p == "fwd+bwd" else None,
                            "row_elems": int(torch.Size(shape[1:]).numel()),
                        })
                rows += new
                log(format_rows(new))
                del model, refs
    return {
        "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "ddspo_fast": df.__version__,
        "threads": torch.get_num_threads(), "copy_gbps": round(copy, 2),
        "beta": BETA, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "definitions": {
            "eager": "the script-form loss written out (ddspo_fast/bench/script_loss.py), "
                     "not the library's torch backend",
            "compile": "torch.compile(fullgraph=True) of the eager script form",
            "ms": "p50 over the timed calls (ms_p20 / ms_p80 beside it); every call after a "
                  "last-level-cache flush; columns interleaved in alternating rounds",
            "host_us": "fwd+bwd rows: mean wall time per call of back-to-back fwd+bwd calls on "
                       f"minimal inputs {list(HOST_SHAPE)} (packed: 3 reference rows per 2), "
                       "one device sync per round of calls: the per-call Python, dispatch, "
                       "checks and autograd cost, which the kernel size does not change",
            "gbps": "pass_bytes / ms (p50); fraction_of_copy: gbps / copy_gbps",
        },
        "rows": rows,
    }


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_rows(rows: List[dict]) -> str:
    head = (f"{'layout':8} {'shape':18} {'dtype':5} {'backend':8} {'pass':16} {'p20 ms':>9} "
            f"{'p50 ms':>9} {'p80 ms':>9} {'GB/s':>8} {'%copy':>6} {'xEager':>7} "
            f"{'xCompile':>8} {'host us':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['layout']:8} {str(tuple(r['shape'])):18} {r['dtype']:5} "
                     f"{r['backend']:8} {r['pass']:16} {r['ms_p20']:9.3f} {r['ms']:9.3f} "
                     f"{r['ms_p80']:9.3f} {r['gbps']:8.2f} "
                     f"{100 * r['fraction_of_copy']:6.1f} {_num(r['vs_eager']):>7} "
                     f"{_num(r['vs_compile']):>8} "
                     f"{'-' if r['host_us'] is None else format(r['host_us'], '.1f'):>8}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> Optional[str]:
    """PNG of fwd+bwd GB/s per backend; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    dts = sorted({r["dtype"] for r in result["rows"]}, key=list(DTYPES).index)
    fig, axes = plt.subplots(1, len(dts), figsize=(5.5 * len(dts), 4), sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dts):
        series: Dict[str, list] = {}
        for r in result["rows"]:
            if r["pass"] == "fwd+bwd" and r["dtype"] == dt and r["layout"] == "standard":
                series.setdefault(r["backend"], []).append((r["row_elems"], r["gbps"]))
        for bk, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=bk)
        ax.axhline(result["copy_gbps"], color="grey", ls="--", label="copy bandwidth")
        ax.set_xscale("log")
        ax.set_xlabel("row size (elements per row; 2B = 16 rows)")
        ax.set_title(f"{dt} fwd+bwd, standard layout (p50)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes the pass must move / time)")
    axes[0][0].legend(fontsize=8, title="eager = script-form loss")
    fig.suptitle(f"ddspo_fast loss on {result['device']}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def default_out(device: torch.device, quick: bool) -> str:
    """benchmarks/results/loss-<device>.json; with --quick runs/bench/ instead, so a quick
    run from the repository root never overwrites the committed results."""
    name = "loss-" + slug(device_name(device))
    if quick:
        return os.path.join("runs", "bench", name + "-quick.json")
    return os.path.join("benchmarks", "results", name + ".json")


def _main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ddspo-fast bench loss", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="Without --out: benchmarks/results/loss-<device>.json "
                                       "(--quick: runs/bench/loss-<device>-quick.json); the "
                                       "plot needs matplotlib (pip install matplotlib).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help=f"comma list of {list(SHAPES)}")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {list(DTYPES)}")
    p.add_argument("--backends", default=None,
                   help="comma list of library backends (default: all available here)")
    p.add_argument("--layouts", default="standard", help="standard, packed or both")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default: see below)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--quick", action="store_true",
                   help="SD1.5 shape only; written under runs/bench/ unless --out is given")
    args = p.parse_args(argv)
    command = "ddspo-fast bench loss " + shlex.join(sys.argv[1:] if argv is None else argv)

    def parse_list(value: str, allowed, flag: str) -> List[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            p.error(f"{flag}: expected a comma list of {list(allowed)}, got {value!r}")
        return items

    from ..devices import check_device

    try:
        device = torch.device(check_device(args.device))
    except ValueError as e:
        p.error(f"--device: {e}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shapes = ["sd15"] if args.quick else parse_list(args.shapes, SHAPES, "--shapes")
    dtypes = parse_list(args.dtypes, DTYPES, "--dtypes")
    layouts = parse_list(args.layouts.replace("both", "standard,packed"),
                         ("standard", "packed"), "--layouts")
    backends = (parse_list(args.backends, BACKENDS, "--backends") if args.backends
                else list(df.available_backends(device)))
    from ..fsio import atomic_write_text, check_writable_file

    out = args.out or default_out(device, args.quick)
    try:  # before the run: a long run must not end with nowhere to put its results
        check_writable_file(out)
    except OSError as e:
        p.error(f"--out: {e.strerror or e}")
    result = run(device, shapes, dtypes, backends, layouts)
    result["command"] = command
    text = json.dumps(result, indent=1) + "\n"
    try:
        atomic_write_text(out, text)
    except OSError as e:  # kept somewhere, and said where
        import tempfile

        fd, kept = tempfile.mkstemp(prefix="ddspo-bench-loss-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"ddspo-fast bench loss: error: cannot write {out} ({e.strerror or e}); the "
              f"results are in {kept}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    png = plot(result, args.plot or os.path.splitext(out)[0] + ".png")
    if png:
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed (pip install matplotlib, or "
              "pip install 'ddspo-fast[plots]')")
    return 0


def main(argv=None) -> int:
    """Run the benchmark; torch's thread count is restored afterwards, so an in-process
    caller (a test, a notebook) is not left on the benchmark's setting."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
