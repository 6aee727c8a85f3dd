"""`python -m bench kernels`: one batch-1 matmul (one decode step's product, x (1, K) @ W.T) on
each weight format and kernel this torch offers on a CPU, for the default model's two shapes:
the tied head (262,144 x 640) and an MLP projection (2,048 x 640).

Batch-1 decoding is bound by reading weights, so the figure of merit is the weight bytes read per
second: a kernel that reads a quarter of the bytes but at a tenth of the speed loses. The rows are
the kernels behind `--quantize` (decode/quantize.py) and the candidates it does not use:

- fp32 `x @ W.T` (aten / oneDNN), the exact baseline;
- fp16 and per-row int8 on FBGEMM (`--quantize fp16`, int8's head);
- int8 and int4 weight-only in groups of 32 on our own C++ kernels (decode/native.py; `--quantize
  int8`'s body, `--quantize int4`'s body and head);
- int8 weight-only on aten's `_weight_int8pack_mm` (what gpt-fast and torchao call on CPU);
- int4 in groups of 32 on aten's `_weight_int4pack_mm_for_cpu` (`--quantize int4`);
- int8 weight-only written as plain torch and compiled by inductor (torch.compile), in the two
  spellings whose dequantization inductor could fuse into the product: `F.linear(x, q.float()) * s`
  and `(x * q.float()).sum(-1) * s`.

Each row: the median (min-max) over `repeats` rounds of the mean time of a burst of calls, after
warm-up (inductor compiles in its warm-up; the compile time is its own column).

A second table streams one token's worth of products from memory, as decoding does: SmolLM2-135M's
30 layers of int8 projections (random weights: the speed does not depend on the values), each
product once, 119 MB in all, far beyond the caches. Four layouts: the seven projections apart or
q/k/v and gate/up stacked (decode/quantize.py), on the allocator's 4 KB pages or moved into 2 MB
pages (decode/huge_pages.py).

A third table times a prompt's prefill through one int8 layer (M rows at once) both ways
decode/quantize.py can: our VNNI kernel in chunks of rows (what `--quantize int8` runs on an
AVX512-VNNI processor) and fp32 BLAS on the weights dequantized for the call (what it runs
elsewhere, and ran there before), on SmolLM2-135M's stacked gate/up and down shapes, the default
model's MLP shape and a 1.5B model's (Qwen2.5-1.5B's down projection), random weights."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.common import fmt_spread, print_table, spread

SHAPES = {"head 262,144 x 640": (262_144, 640), "MLP 2,048 x 640": (2_048, 640)}
# SmolLM2-135M's projections (N, K), and the groups decoding stacks
PROJECTIONS = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
               "up": (1536, 576), "down": (576, 1536)}
STACKS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
QUICK_SHAPES = {"head-shaped 16,384 x 640": (16_384, 640)}
PREFILL_SHAPES = {"SmolLM2 gate/up 3,072 x 576": (3_072, 576), "SmolLM2 down 576 x 1,536": (576, 1_536),
                  "MLP 2,048 x 640": (2_048, 640), "1.5B down 1,536 x 8,960": (1_536, 8_960)}
PREFILL_ROWS = (17, 128, 512, 2_048)


def _int8_linear(x, q, scale):
    return F.linear(x, q.to(x.dtype)) * scale


def _int8_mul_sum(x, q, scale):
    return (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * scale


def _kernels(n: int, k: int) -> dict[str, tuple[object, int]]:
    """name -> (a function of x (1, K) giving (1, N), weight bytes it reads per call)."""
    from instructkit.decode import native
    from instructkit.decode.quantize import (Fp16Linear, Int4GroupLinear, Int4Linear, Int8GroupLinear, Int8RowLinear,
                                             kernels_available)

    weight = torch.randn(n, k) * 0.02
    int8 = Int8RowLinear.quantize(weight)  # q (N, K) int8, scale (N,): every int8 row below reads these
    q, scale = int8["q"], int8["scale"]
    kernels: dict[str, tuple[object, int]] = {"fp32 x @ W.T (exact)": (lambda x: x @ weight.T, n * k * 4)}
    if kernels_available("fp16"):
        kernels["fp16, FBGEMM linear_dynamic_fp16"] = (Fp16Linear(Fp16Linear.quantize(weight), None), n * k * 2)
        kernels["int8 per row, FBGEMM linear_dynamic"] = (Int8RowLinear(int8, None), n * k)
    if native.available():
        group_bytes = n * k + n * k // 32 * 4  # int8 weights + one fp32 scale per 32
        kernels["int8 groups of 32, ours (C++)"] = (Int8GroupLinear(Int8GroupLinear.quantize(weight), None), group_bytes)
        int4_bytes = n * k // 2 + n * k // 32 * 4  # two weights a byte + fp16 scale and low per 32
        kernels["int4 groups of 32, ours (C++)"] = (Int4GroupLinear(Int4GroupLinear.quantize(weight), None), int4_bytes)
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        kernels["int8 per row, aten _weight_int8pack_mm"] = (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale), n * k)
    if kernels_available("int4"):
        int4 = Int4Linear(Int4Linear.quantize(weight), None)
        kernels["int4 groups of 32, aten _weight_int4pack_mm_for_cpu"] = (int4, n * k // 2 + n * k // 32 * 8)
    linear, mul_sum = torch.compile(_int8_linear), torch.compile(_int8_mul_sum)
    kernels["int8 per row, inductor: F.linear(x, q.float()) * s"] = (lambda x: linear(x, q, scale), n * k)
    kernels["int8 per row, inductor: (x * q.float()).sum(-1) * s"] = (lambda x: mul_sum(x, q, scale), n * k)
    return kernels


def _token_of_products(stacked: bool, huge: bool, layers: int) -> tuple[object, int]:
    """A function running every int8 product of `layers` layers once (one row each), and the
    weight bytes they read."""
    from instructkit.decode import huge_pages
    from instructkit.decode.quantize import Int8GroupLinear

    shapes = dict(PROJECTIONS)
    if stacked:
        for group, names in STACKS.items():
            shapes[group] = (sum(shapes[name][0] for name in names), shapes[names[0]][1])
            for name in names:
                del shapes[name]
    model = torch.nn.ModuleList(
        torch.nn.ModuleDict({name: Int8GroupLinear(Int8GroupLinear.quantize(torch.randn(n, k) * 0.02), None)
                             for name, (n, k) in shapes.items()}) for _ in range(layers))
    if huge:
        huge_pages.gather(model)
    inputs = {name: torch.randn(1, k) for name, (_, k) in shapes.items()}

    def token(_=None):
        for layer in model:
            for name, linear in layer.items():
                linear(inputs[name])

    return token, sum(n * k + n * k // 32 * 4 for n, k in shapes.values()) * layers


def streams(quick: bool, repeats: int) -> dict:
    """The second table of the module docstring."""
    from instructkit.decode import huge_pages, native

    if not native.available():
        return {}
    layers, burst_s = (4 if quick else 30), (0.2 if quick else 1.5)
    layouts = {f"{'stacked' if stacked else 'apart'}, {'2 MB' if huge else '4 KB'} pages": (stacked, huge)
               for stacked in (False, True) for huge in (False, True) if not huge or huge_pages.available()}
    made = {name: _token_of_products(stacked, huge, layers) for name, (stacked, huge) in layouts.items()}
    times: dict[str, list[float]] = {name: [] for name in made}
    with torch.no_grad():
        for _ in range(repeats):
            for name, (token, _) in made.items():
                token()
                times[name].append(_seconds_per_call(token, None, burst_s))
    results, rows = {}, []
    for name, (_, nbytes) in made.items():
        ms, gbps = spread([t * 1e3 for t in times[name]]), spread([nbytes / t / 1e9 for t in times[name]])
        results[name] = {"ms": ms, "weight_gb_per_s": gbps, "weight_bytes": nbytes}
        rows.append([name, fmt_spread(ms, "{:.2f}"), fmt_spread(gbps, "{:.1f}"), f"{nbytes / 1e6:.0f}"])
    print_table(f"One token's int8 products, SmolLM2-135M's {layers} layers, random weights ({torch.get_num_threads()} "
                f"threads; median (min-max) of {repeats} rounds)", ["layout", "ms a token", "weight GB/s", "weight MB"], rows)
    return {"layers": layers, "layouts": results}


def prefills(quick: bool, repeats: int) -> dict:
    """The third table of the module docstring."""
    from instructkit.decode import native
    from instructkit.decode.quantize import Int8GroupLinear

    if not native.available() or not native.int8_block_rows():
        print("Prefill table skipped: no AVX512-VNNI int8 kernel here (prefills take fp32 BLAS on dequantized weights)")
        return {}
    shapes = {"SmolLM2 gate/up 3,072 x 576": (3_072, 576)} if quick else PREFILL_SHAPES
    row_counts, burst_s = ((17, 128) if quick else PREFILL_ROWS), (0.2 if quick else 0.6)
    results, rows = {}, []
    with torch.no_grad():
        for shape_name, (n, k) in shapes.items():
            layer = Int8GroupLinear(Int8GroupLinear.quantize(torch.randn(n, k) * 0.02), None)
            assert layer.kernel_takes_prefill()
            ways = {"kernel": layer, "BLAS": layer.dequantized_product}
            for count in row_counts:
                x = torch.randn(count, k)
                times: dict[str, list[float]] = {way: [] for way in ways}
                for _ in range(repeats):
                    for way, fn in ways.items():
                        fn(x)
                        times[way].append(_seconds_per_call(fn, x, burst_s))
                ms = {way: spread([t * 1e3 for t in times[way]]) for way in ways}
                ratio = spread([b / a for a, b in zip(times["kernel"], times["BLAS"])])
                results[f"{shape_name} | {count} rows"] = {"kernel_ms": ms["kernel"], "blas_ms": ms["BLAS"],
                                                           "blas_over_kernel": ratio}
                rows.append([shape_name, str(count), fmt_spread(ms["kernel"], "{:.2f}"), fmt_spread(ms["BLAS"], "{:.2f}"),
                             fmt_spread(ratio, "{:.2f}x")])
    print_table(f"A prefill's product through one int8 layer, random weights ({torch.get_num_threads()} threads; "
                f"median (min-max) of {repeats} rounds)", ["shape", "rows", "VNNI kernel ms", "dequantized BLAS ms",
                                                            "BLAS / kernel"], rows)
    return results


def _seconds_per_call(fn, x, budget_s: float) -> float:
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < budget_s:
        fn(x)
        calls += 1
    return (time.perf_counter() - started) / calls


def run(quick: bool = False, repeats: int | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    burst_s = 0.2 if quick else 1.5
    results: dict[str, dict] = {}
    rows = []
    for shape_name, (n, k) in (QUICK_SHAPES if quick else SHAPES).items():
        x = torch.randn(1, k)
        kernels = _kernels(n, k)
        exact = kernels["fp32 x @ W.T (exact)"][0](x)
        warmup_s, errors = {}, {}
        with torch.no_grad():
            for name, (fn, _) in kernels.items():
                started = time.perf_counter()
                out = fn(x)  # inductor compiles here
                warmup_s[name] = time.perf_counter() - started
                errors[name] = float((out - exact).abs().max() / exact.abs().max())
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(repeats):  # rounds interleave the kernels, so drift hits them all alike
                for name, (fn, _) in kernels.items():
                    times[name].append(_seconds_per_call(fn, x, burst_s))
        for name, (_, nbytes) in kernels.items():
            ms = spread([t * 1e3 for t in times[name]])
            gbps = spread([nbytes / t / 1e9 for t in times[name]])
            results[f"{shape_name} | {name}"] = {"ms": ms, "weight_gb_per_s": gbps, "weight_bytes": nbytes,
                                                 "first_call_s": warmup_s[name], "max_rel_error": errors[name]}
            rows.append([shape_name, name, fmt_spread(ms, "{:.2f}"), fmt_spread(gbps, "{:.1f}"),
                         f"{nbytes / 1e6:.0f}", f"{warmup_s[name]:.1f}", f"{errors[name]:.1e}"])
    print_table(f"Batch-1 matmul by weight format and kernel ({torch.get_num_threads()} threads; median (min-max) of "
                f"{repeats} rounds)", ["shape", "kernel", "ms a call", "weight GB/s", "weight MB", "first call s",
                                       "max error / max |y|"], rows)
    return {"repeats": repeats, "threads": torch.get_num_threads(), "kernels": results,
            "streams": streams(quick, repeats), "prefills": prefills(quick, repeats)}
