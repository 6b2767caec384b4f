#!/usr/bin/env python3
"""Writes tests/fixtures/nf4_fp16: torchao's NF4 quantisation (tests/fixtures/nf4/spec.md, sections
2-4) of an fp16 tensor, emulated with numpy in fp16 arithmetic (every step computed in float32 and
rounded to fp16, as torch's CPU half ops do), and its dequantisation after the fields are cast to
bf16 (what torchao's NF4Tensor.copy_ does when an fp16 checkpoint is loaded into a bf16 QLoRA
model). This is an independent emulation of the written spec, not torchao output: no fixture made
with torchao covers fp16. Needs numpy only.

    python3 scripts/nf4_fp16_reference.py                 # writes the fixture
    python3 scripts/nf4_fp16_reference.py --differences   # how often rounding to bf16 first differs
"""
import json
import os
import struct
import sys

import numpy as np

LITERALS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
            0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def to_bf16(x):
    """Round float32 to bfloat16 (nearest, ties to even), returned as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def to_f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def quantize(w, rnd):
    blocks = w.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    mean = rnd(np.float32(absmax.astype(np.float64).sum() / absmax.size))
    centred = rnd(absmax - mean).reshape(-1, 256)
    group_max = np.abs(centred).max(axis=1)
    factor = rnd(rnd(np.float32(1.0) / rnd(np.float32(2.0) * group_max)) * np.float32(256.0))
    scalers = np.clip(np.round(rnd(centred * factor[:, None])), -128, 127).astype(np.int8).reshape(-1)
    normalised = rnd(blocks / absmax[:, None]).reshape(-1)
    levels = rnd(np.array(LITERALS, dtype=np.float32))
    codes = np.abs(rnd(normalised[:, None] - levels[None, :])).argmin(axis=1).astype(np.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, scalers, factor, mean, levels, codes


def dequantize(codes, scalers, factor, mean, levels, rnd):
    f = rnd(factor)
    q = scalers.astype(np.float32).reshape(-1, 256)
    scale = rnd(rnd(q / f[:, None]) + rnd(mean)).reshape(-1)
    values = rnd(levels)[codes].reshape(-1, 64)
    return rnd(values * scale[:, None]).reshape(-1)


def save_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    kinds = {np.float16: "F16", np.float32: "F32", np.uint8: "U8", np.int8: "I8"}
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": kinds[array.dtype.type], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header, out = json.loads(data[8:8 + n]), {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + n + start:8 + n + end]
        if info["dtype"] == "BF16":
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            kinds = {"U8": np.uint8, "I8": np.int8, "F16": np.float16, "F32": np.float32}
            array = np.frombuffer(raw, dtype=kinds[info["dtype"]])
        out[name] = array.reshape(info["shape"])
    return out


def check_against_torchao(fixtures):
    """The same code in bf16 arithmetic reproduces torchao's bf16 fixtures bit for bit."""
    cases = ["w128x128_seed0", "w128x256_seed3_outliers", "w384x128_seed2"]
    for case in cases:
        t = load_safetensors(os.path.join(fixtures, "nf4", case + ".safetensors"))
        w = t["input_bf16"].astype(np.float32).reshape(-1)
        packed, scalers, factor, mean, levels, codes = quantize(w, to_bf16)
        dequantized = dequantize(codes, scalers, factor, mean, levels, to_bf16)
        assert (packed == t["quantized_data"].reshape(-1)).all(), case
        assert (scalers == t["quantized_scalers"].reshape(-1)).all(), case
        assert (dequantized == t["dequantized_bf16"].reshape(-1)).all(), case
    return cases


def main():
    rng = np.random.default_rng(2026)
    weight = rng.normal(0.0, 0.02, size=(128, 256)).astype(np.float16)
    w = weight.astype(np.float32).reshape(-1)
    packed, scalers, factor, mean, levels, codes = quantize(w, to_f16)
    dequantized = dequantize(codes, scalers, factor, mean, levels, to_bf16)
    # The path that rounds the fp16 tensor to bf16 first quantises differently.
    bf_codes = quantize(to_bf16(w), to_bf16)[5]
    fixtures = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    checked = check_against_torchao(fixtures)
    out = os.path.join(fixtures, "nf4_fp16")
    os.makedirs(out, exist_ok=True)
    save_safetensors(os.path.join(out, "nf4_fp16.safetensors"), {
        "weight": weight,
        "quantized_data": packed,
        "quantized_scalers": scalers,
        "quantization_factor": factor.astype(np.float16),
        "scaler_mean": np.array([mean], dtype=np.float16),
        "dequantized_bf16": dequantized,
    })
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({
            "made_by": "scripts/nf4_fp16_reference.py (numpy emulation of tests/fixtures/nf4/spec.md in fp16 arithmetic; not torchao output)",
            "emulation_checked_in_bf16_against_torchao_fixtures": checked,
            "weight": "N(0, 0.02), shape [128, 256], fp16, numpy seed 2026",
            "codes_differing_if_rounded_to_bf16_first": int((bf_codes != codes).sum()),
            "elements": int(codes.size),
        }, f, indent=2)


def differences():
    """Codes and int8 scalers that differ when the fp16 tensor is rounded to bf16 first."""
    rng = np.random.default_rng(0)
    for shape in [(1024, 4096), (4096, 1024)]:
        w = to_f16(rng.normal(0.0, 0.02, size=shape).astype(np.float32)).reshape(-1)
        _, q_f16, _, _, _, c_f16 = quantize(w, to_f16)
        _, q_bf16, _, _, _, c_bf16 = quantize(to_bf16(w), to_bf16)
        print(f"{shape}: codes differ {100 * np.mean(c_f16 != c_bf16):.2f}%, "
              f"scalers differ {100 * np.mean(q_f16 != q_bf16):.1f}%")


if __name__ == "__main__":
    if sys.argv[1:] == ["--differences"]:
        differences()
    elif sys.argv[1:]:
        sys.exit("usage: nf4_fp16_reference.py [--differences]")
    else:
        main()
