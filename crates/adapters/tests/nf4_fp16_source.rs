//! An fp16 checkpoint (e.g. `meta-llama/Llama-2-7b-hf`) in a bf16 QLoRA run: torchao quantises
//! the fp16 tensor in fp16 arithmetic and casts the fields to bf16. Checked against
//! tests/fixtures/nf4_fp16, a numpy emulation of spec.md in fp16 arithmetic
//! (scripts/nf4_fp16_reference.py; the same code in bf16 reproduces torchao's bf16 fixtures).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use half::f16;
use tune_adapters::nf4::{quantizing_source, Nf4Tensor, Precision};

struct Raw {
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn fixture() -> HashMap<String, Raw> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/nf4_fp16/nf4_fp16.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let raw = Raw {
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            };
            (name, raw)
        })
        .collect()
}

fn f16s(raw: &Raw) -> Vec<f32> {
    raw.data
        .chunks(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[test]
fn an_fp16_tensor_is_quantised_in_fp16_and_dequantised_in_bf16() {
    let fx = fixture();
    let weight_raw = &fx["weight"];
    let values: Vec<f16> = f16s(weight_raw).into_iter().map(f16::from_f32).collect();
    let weight = Tensor::from_vec(values, weight_raw.shape.as_slice(), &Device::Cpu).unwrap();

    let nf4 = Nf4Tensor::quantize_source(&weight, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(nf4.quantised_in(), Precision::F16);
    assert_eq!(nf4.dtype(), DType::BF16);
    assert_eq!(nf4.packed_codes().unwrap(), fx["quantized_data"].data);
    let scalers: Vec<i8> = fx["quantized_scalers"]
        .data
        .iter()
        .map(|&b| b as i8)
        .collect();
    assert_eq!(nf4.quantized_scalers().unwrap(), scalers);
    assert_eq!(
        nf4.quantization_factors(),
        f16s(&fx["quantization_factor"]).as_slice()
    );
    assert_eq!(nf4.scaler_mean(), f16s(&fx["scaler_mean"])[0]);
    let want: Vec<f32> = fx["dequantized_bf16"]
        .data
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let got: Vec<f32> = nf4
        .dequantize()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);

    // What a QLoRA model build sees: the weight already in bf16, the fp16 tensor as its source.
    let in_bf16 = weight.to_dtype(DType::BF16).unwrap();
    let (from_source, used) =
        quantizing_source(Some(weight.clone()), || Nf4Tensor::quantize(&in_bf16));
    let from_source = from_source.unwrap();
    assert!(used);
    assert_eq!(
        from_source.packed_codes().unwrap(),
        fx["quantized_data"].data
    );
    // Rounding to bf16 first (no source) lands elsewhere for some codes.
    let rounded_first = Nf4Tensor::quantize(&in_bf16).unwrap();
    assert_eq!(rounded_first.quantised_in(), Precision::Bf16);
    assert_ne!(
        rounded_first.packed_codes().unwrap(),
        fx["quantized_data"].data
    );
}
