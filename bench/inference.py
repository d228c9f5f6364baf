"""Inference speed and fidelity, measured against peers in the same run.

- the machine's matrix-multiply peak in fp32 and bf16 (large torch.mm);
- the reference ResNet-9 generator (Zhu et al., ngf 64) at 256x256: FLOPs per slice counted
  by forward hooks on every convolution, achieved GFLOP/s (fp32, bf16 autocast, bf16 weights as
  synthesis runs them, and those under torch.compile) and the best bf16 variant as a fraction
  of the bf16 peak;
- the shipped model: sCT difference between bf16 and fp32 inference (MAE in HU);
- the whole synthesis of a 64-slice 256x256 series (read spool files, volume, normalise,
  infer, write CT and SR files) as a ratio to the generator forward alone (the same batches at
  the model grid, the series' own normalised slices, nothing around them; one forward per view
  of the card's test-time augmentation, as synthesis runs them, and, separately, one view),
  with the time of each stage: for the shipped model (`synthesis_over_forward`) and for a
  generator of the paper's size, ResNet-9 ngf 64 on the 1 mm grid
  (`synthesis_over_forward_paper_sized`).

On a CPU without native bf16 (no AVX-512 BF16 or AMX: most AVX2 machines) bf16 is emulated,
~64x slower than fp32, and the node runs fp32 there: the bf16 peak, the bf16 variants and the
shipped model's bf16 comparison are skipped (their figures null, ``bf16_skipped`` says why;
``--bf16-anyway`` runs them all the same), and the generator is measured in fp32 and fp32 under
torch.compile against the fp32 peak. ``gen_fraction_of_peak`` is the best variant in the
precision the node runs on the device, against that precision's peak (``peak_precision``).
``--slices`` makes the series shorter where 64 slices with the card's test-time views take
minutes a run (every ratio is of the same series).

Last line: one JSON object with gen_fraction_of_bf16_peak, bf16_vs_fp32_mae_hu,
synthesis_over_forward, slices_per_s, device.

    .venv/bin/python bench/inference.py [--device auto] [--repeats 3] [--slices 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
UID_ROOT = "1.2.826.0.1.3680043.8.498."
sys.path.insert(0, str(ROOT))

from synthesis.ct_writer import SyntheticCTSeries  # noqa: E402
from synthesis.infer import (augmented, auto_batch_size, choose_device, native_bf16, normalised, precision_name,  # noqa: E402
                             prepared, resolve_precision, synthesize)
from synthesis.model_file import LoadedModel, default_model_path, load_model  # noqa: E402
from synthesis.networks import ResnetGenerator, low_precision_copy, size_multiple  # noqa: E402
from synthesis.sr_writer import build_provenance_sr  # noqa: E402
from synthesis.volume import assemble  # noqa: E402
from training.phantom_dicom import write_mr_series  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats: int, device: torch.device) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 50 if device.type == "cuda" else 5

    def run() -> None:
        for _ in range(iters):
            torch.mm(a, b)

    return 2 * n**3 * iters / best_of(run, repeats, device) / 1e9


def conv_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass, counted by hooks on every (transposed) convolution."""
    total = [0.0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kh, kw = module.kernel_size  # type: ignore[misc]
        cin, cout, groups = module.in_channels, module.out_channels, module.groups  # type: ignore[attr-defined]
        if isinstance(module, nn.ConvTranspose2d):
            spatial = inputs[0].shape[-2] * inputs[0].shape[-1]
        else:
            spatial = output.shape[-2] * output.shape[-1]
        total[0] += 2.0 * cin * cout * kh * kw * spatial / groups * output.shape[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0]


def pipeline(model: LoadedModel, series, mr: np.ndarray, out: Path, device: torch.device, label: str, precision: str,  # type: ignore[no-untyped-def]
             compile: bool, repeats: int) -> dict:
    slices = len(mr)
    """Time, for one model: its generator forward alone over the series' batches at the model grid;
    the synthesize() call; and the whole synthesis (read the files, volume, synthesize, encode and
    write the CT files, build and write the SR), with the mean time of each stage."""
    side = round(256 * 1.0 / model.pixel_spacing_mm)
    side += (-side) % 4
    low = resolve_precision(precision, device)
    dtype = low or torch.float32
    batch = auto_batch_size(model.generator.to(device), (side, side), device, low)  # as the node sizes it
    synthesize_s = best_of(lambda: synthesize(mr, (1.0, 1.0), model, device, batch, precision=precision, compile=compile), repeats, device)
    net = prepared(model.generator.to(device, memory_format=torch.channels_last), low, compile)
    # The series' own slices, normalised as synthesis does and brought to the model grid: the same
    # numbers the network sees inside synthesize().
    unit = torch.from_numpy(normalised(mr, model))[:, None]
    if unit.shape[-2:] != (side, side):
        unit = F.interpolate(unit, size=(side, side), mode="bilinear", align_corners=False)
    batches = [unit[i:i + batch].to(device, dtype).contiguous(memory_format=torch.channels_last) for i in range(0, slices, batch)]

    def generator_only() -> None:  # the forwards synthesize() runs: one per view of the model's test-time augmentation
        with torch.inference_mode():
            for x in batches:
                augmented(net, x, model.test_time_augmentation, size_multiple(model.generator))

    def one_view() -> None:
        with torch.inference_mode():
            for x in batches:
                net(x)

    forward_s = best_of(generator_only, repeats, device)
    one_view_s = forward_s if model.test_time_augmentation == "none" else best_of(one_view, repeats, device)
    stages: dict[str, float] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = fn()
        sync(device)
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - started
        return result

    out.mkdir(exist_ok=True)

    def whole() -> None:
        datasets = timed("read", lambda: [pydicom.dcmread(f) for f in series.files])
        source = timed("volume", lambda: assemble(datasets))
        hu = timed("synthesize", lambda: synthesize(source.volume.voxels, source.volume.pixel_spacing, model, device, batch,
                                                     precision=precision, compile=compile))

        def write_ct() -> SyntheticCTSeries:
            ct = SyntheticCTSeries(source=source, hu=hu, model=model, uid_root=UID_ROOT, device_label=label)
            for i, sop_uid in enumerate(ct.sop_instance_uids):
                (out / f"{sop_uid}.dcm").write_bytes(ct.encoded(i))
            return ct

        ct = timed("ct", write_ct)

        def write_sr() -> None:
            sr = build_provenance_sr(ct=ct, mr_headers=source.headers, uid_root=UID_ROOT, processing_seconds=1.0, device_label=label)
            sr.save_as(out / "sr.dcm", enforce_file_format=True)

        timed("sr", write_sr)

    whole()  # warm-up (first-use imports of pixel handlers and the like)
    stages.clear()
    whole_s = best_of(whole, repeats, device)
    runs = repeats + 1  # best_of runs once more as its own warm-up
    return {"forward_s": forward_s, "one_view_s": one_view_s, "synthesize_s": synthesize_s, "whole_s": whole_s, "batch": batch,
            "stage_ms": {name: round(total / runs * 1000, 1) for name, total in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=64, help="slices of the synthesized series (default 64)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--bf16-anyway", action="store_true", help="run the bf16 measurements where bf16 is only emulated")
    parser.add_argument("--batch", type=int, default=0, help="slices per batch for the reference generator (default 4 CPU, 64 GPU)")
    args = parser.parse_args()
    if args.slices < 1 or args.repeats < 1:
        parser.error("--slices and --repeats must be at least 1")
    choice = choose_device(args.device)
    device = choice.device
    batch = args.batch or (64 if device.type == "cuda" else 4)
    print(f"device: {choice.label} ({choice.reason}); {platform.machine()}, torch {torch.__version__}")
    with_bf16 = native_bf16(device) or args.bf16_anyway
    bf16_skipped = None if with_bf16 else (
        f"bf16 is not native on this {device.type} (no AVX-512 BF16 or AMX): emulated, far slower than fp32, and the node runs fp32 here")
    if bf16_skipped:
        print(f"bf16 skipped: {bf16_skipped} (--bf16-anyway runs it)")
    precision = precision_name(resolve_precision("auto", device))  # what the node runs on this device

    peak32 = matmul_peak(torch.float32, device, args.repeats)
    peak16 = matmul_peak(torch.bfloat16, device, args.repeats) if with_bf16 else None
    print(f"matmul peak: fp32 {peak32:8.1f} GFLOP/s" + (f"   bf16 {peak16:8.1f} GFLOP/s" if peak16 else ""))

    reference = ResnetGenerator(ngf=64, n_blocks=9).to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 256, 256, device=device).contiguous(memory_format=torch.channels_last)
    flops = conv_flops(reference, x[:1])
    results = {}
    variants = [("fp32", reference, torch.float32, False)]  # name, network, input dtype, autocast
    if with_bf16:
        variants += [("bf16 autocast", reference, torch.float32, True),
                     ("bf16 weights", low_precision_copy(reference, torch.bfloat16), torch.bfloat16, False)]  # what synthesize runs for bf16
    if not args.no_compile:
        if with_bf16:
            variants.append(("bf16 weights+compile", prepared(reference, torch.bfloat16, True), torch.bfloat16, False))
        if precision == "fp32":
            variants.append(("fp32+compile", prepared(reference, None, True), torch.float32, False))
    for name, net, dtype, autocast in variants:
        xin = x.to(dtype)

        def forward() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                net(xin)

        started = time.perf_counter()
        seconds = best_of(forward, args.repeats, device)
        results[name] = (batch / seconds, flops * batch / seconds / 1e9)
        extra = f" (compiling and runs took {time.perf_counter() - started:.0f} s)" if "compile" in name else ""
        print(f"ResNet-9 ngf64 256x256 {name}: {flops / 1e9:.1f} GFLOP/slice, {results[name][0]:.2f} slices/s, {results[name][1]:.1f} GFLOP/s{extra}")
    best16 = max((k for k in results if k.startswith("bf16")), key=lambda k: results[k][0]) if with_bf16 else None
    fraction16 = results[best16][1] / peak16 if best16 and peak16 else None
    # The node's own precision on this device, against that precision's peak.
    node_prefix = "bf16" if precision == "bf16" and with_bf16 else "fp32"
    best = max((k for k in results if k.startswith(node_prefix)), key=lambda k: results[k][0])
    fraction = results[best][1] / (peak16 if node_prefix == "bf16" else peak32)

    # The shipped model: bf16 against fp32, and the whole pipeline against the forward alone.
    model = load_model(default_model_path())
    work = Path(tempfile.mkdtemp(prefix="mr2ct-bench-infer-"))
    slices = args.slices
    try:
        series = write_mr_series(work / "mr", seed=3, slices=slices, size=256, pixel_spacing=1.0, slice_spacing=2.0)
        mr = np.stack([pydicom.dcmread(f).pixel_array for f in series.files]).astype(np.float32)
        body = series.labels > 0
        mae_bf16 = mae_bf16_one = None
        if with_bf16:
            hu32 = synthesize(mr, (1.0, 1.0), model, device, 16, precision="fp32")
            hu16 = synthesize(mr, (1.0, 1.0), model, device, 16, precision="bf16")
            mae_bf16 = float(np.abs(hu16 - hu32)[body].mean())
            # The same with one forward per slice (what the node runs with test_time_augmentation = "none").
            hu32_one = synthesize(mr, (1.0, 1.0), model, device, 16, precision="fp32", augment="none")
            hu16_one = synthesize(mr, (1.0, 1.0), model, device, 16, precision="bf16", augment="none")
            mae_bf16_one = float(np.abs(hu16_one - hu32_one)[body].mean())
        shipped = pipeline(model, series, mr, work / "out-shipped", device, choice.label, precision, False, args.repeats)
        # The same pipeline around a generator of the paper's size (ResNet-9, ngf 64, random
        # weights, on a 1 mm grid = the 256x256 matrix), compiled as a node would run it.
        reference_card = {**model.card, "parameters": {"in_channels": 1, "out_channels": 1, "ngf": 64, "n_blocks": 9},
                          "pixel_spacing_mm": 1.0, "input_size": 256, "sha256": "f" * 64, "test_time_augmentation": "none"}
        reference_model = LoadedModel(ResnetGenerator(ngf=64, n_blocks=9).eval(), reference_card, model.weights_path)
        paper_sized = pipeline(reference_model, series, mr, work / "out-reference", device, choice.label, precision, not args.no_compile,
                               args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, figures, views in (("shipped model", shipped, model.test_time_augmentation), ("ResNet-9 ngf64 (paper size)", paper_sized, "none")):
        print(f"{name}, {slices} slices 256x256 ({precision}, test-time augmentation {views}): generator forward alone {figures['forward_s']:.3f} s "
              f"(one view {figures['one_view_s']:.3f} s), synthesize() (normalise, "
              f"resample, forward, back to the MR matrix) {figures['synthesize_s']:.3f} s, whole synthesis {figures['whole_s']:.3f} s "
              f"= {figures['whole_s'] / figures['forward_s']:.2f}x the forward")
        print(f"  batches of {figures['batch']}; whole synthesis, mean per stage (ms): "
              + ", ".join(f"{k} {v}" for k, v in figures["stage_ms"].items()))
    if with_bf16:
        print(f"bf16 vs fp32 sCT difference inside the head: {mae_bf16:.2f} HU ({model.test_time_augmentation}), {mae_bf16_one:.2f} HU (one view)")

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    def rate(name: str) -> float | None:
        return round(results[name][0], 2) if name in results else None

    out = {
        "gen_fraction_of_bf16_peak": rounded(fraction16, 3),
        "gen_fraction_of_peak": round(fraction, 3),
        "peak_precision": node_prefix,
        "bf16_vs_fp32_mae_hu": rounded(mae_bf16, 3),
        "synthesis_over_forward": round(shipped["whole_s"] / shipped["forward_s"], 3),
        "synthesis_over_synthesize_call": round(shipped["whole_s"] / shipped["synthesize_s"], 3),
        "synthesis_over_one_view_forward": round(shipped["whole_s"] / shipped["one_view_s"], 3),
        "bf16_vs_fp32_mae_hu_one_view": rounded(mae_bf16_one, 3),
        "test_time_augmentation": model.test_time_augmentation,
        "synthesis_over_forward_paper_sized": round(paper_sized["whole_s"] / paper_sized["forward_s"], 3),
        "slices_per_s": round(results[best][0], 2),
        "slices_per_s_bf16_autocast": rate("bf16 autocast"),
        "slices_per_s_bf16_weights": rate("bf16 weights"),
        "slices_per_s_fp32": rate("fp32"),
        "slices_per_s_fp32_compiled": rate("fp32+compile"),
        "best_variant": best,
        "shipped_model_slices_per_s": round(slices / shipped["synthesize_s"], 1),
        "series_slices": slices,
        "whole_synthesis_stage_ms": shipped["stage_ms"],
        "matmul_fp32_gflops": round(peak32, 1),
        "matmul_bf16_gflops": rounded(peak16, 1),
        "bf16_skipped": bf16_skipped,
        "device": choice.label,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
