//! IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning") as a `tune` adapter plugin, with Hugging Face PEFT's semantics.
//!
//! A learned vector `l`, initialised to ones, scales features of a frozen linear layer:
//! - the *output* of attention projections (PEFT's default for Llama: k_proj and v_proj):
//!   `y = (x W^T) * l`, with `l` stored as `[out_features, 1]`;
//! - the *input* of the MLP's down projection (PEFT's "feedforward module"):
//!   `y = (x * l) W^T`, with `l` stored as `[1, in_features]`.
//!
//! Both shapes are what PEFT saves as `ia3_l`, and what `tune` gives a width-1 parameter at an
//! output or input site, so the exported adapter loads in PEFT unchanged.

use tune_plugin_api::{export_plugin, Adapter, Layer, Param, Peft, Site, Target};

pub struct Ia3;

impl Adapter for Ia3 {
    const NAME: &'static str = "ia3";
    const ABOUT: &'static str =
        "IA3: learned vectors scaling attention outputs and the MLP down projection's input";

    // PEFT's IA3 scales the output of every target module except the feedforward ones, whose
    // input it scales. In Llama's MLP only the down projection (w2) is a feedforward module; the
    // gate and up projections (w1, w3) are not IA3 targets, so `apply_lora_to_mlp: True` adapts
    // w2 alone.
    const TARGETS: &'static [Target] = &[
        Target::output("q_proj"),
        Target::output("k_proj"),
        Target::output("v_proj"),
        Target::output("output_proj"),
        Target::input("w2"),
        Target::output("output"),
    ];

    const PARAMS: &'static [Param] = &[Param::new("ia3_l", 1)];

    const PEFT: Peft = Peft {
        config: r#"{
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "fan_in_fan_out": false,
            "init_ia3_weights": true,
            "modules_to_save": null,
            "inference_mode": true
        }"#,
        input_modules_key: "feedforward_modules",
    };

    fn init(
        _site: Site,
        _features: usize,
        _param: usize,
        _seed: u64,
        out: &mut [f32],
    ) -> Result<(), String> {
        // Ones: training starts from the base model.
        out.fill(1.0);
        Ok(())
    }

    fn forward(layer: &Layer, h: &[f32], z: &mut [f32]) -> Result<(), String> {
        let l = layer.params[0];
        for (h_row, z_row) in h
            .chunks_exact(layer.features)
            .zip(z.chunks_exact_mut(layer.features))
        {
            for ((z, h), l) in z_row.iter_mut().zip(h_row).zip(l) {
                *z = h * l;
            }
        }
        Ok(())
    }

    fn backward(
        layer: &Layer,
        h: &[f32],
        dz: &[f32],
        dh: &mut [f32],
        dparams: &mut [&mut [f32]],
    ) -> Result<(), String> {
        // z = h * l elementwise per row: dh = dz * l, and dl sums dz * h over the rows.
        let l = layer.params[0];
        let dl = &mut *dparams[0];
        let rows = h
            .chunks_exact(layer.features)
            .zip(dz.chunks_exact(layer.features));
        for ((h_row, dz_row), dh_row) in rows.zip(dh.chunks_exact_mut(layer.features)) {
            for j in 0..layer.features {
                dh_row[j] = dz_row[j] * l[j];
                dl[j] += dz_row[j] * h_row[j];
            }
        }
        Ok(())
    }

    fn merge(
        layer: &Layer,
        weight: &mut [f32],
        _out_features: usize,
        in_features: usize,
    ) -> Result<(), String> {
        // PEFT's merge: weight * ia3_l, broadcasting [out, 1] over rows or [1, in] over columns.
        let l = layer.params[0];
        for (i, row) in weight.chunks_exact_mut(in_features).enumerate() {
            for (j, w) in row.iter_mut().enumerate() {
                *w *= match layer.site {
                    Site::Output => l[i],
                    Site::Input => l[j],
                };
            }
        }
        Ok(())
    }
}

export_plugin!(name: "tune-ia3", version: env!("CARGO_PKG_VERSION"), adapters: [Ia3]);

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(site: Site, features: usize, rows: usize, l: &[f32]) -> Layer<'_> {
        Layer {
            site,
            features,
            rows,
            params: vec![l],
        }
    }

    /// L = sum(probe * g(h; l)): the gradients of this scalar are what backward computes.
    fn loss(h: &[f32], l: &[f32], probe: &[f32]) -> f64 {
        let mut z = vec![0f32; h.len()];
        Ia3::forward(
            &layer(Site::Output, l.len(), h.len() / l.len(), l),
            h,
            &mut z,
        )
        .unwrap();
        z.iter()
            .zip(probe)
            .map(|(z, p)| (*z as f64) * (*p as f64))
            .sum()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (features, rows) = (3, 4);
        let h: Vec<f32> = (0..rows * features)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let probe: Vec<f32> = (0..rows * features)
            .map(|i| (i as f32 * 0.91).cos())
            .collect();
        let l = vec![0.5f32, 1.5, -2.0];
        let (mut dh, mut dl) = (vec![0f32; h.len()], vec![0f32; features]);
        Ia3::backward(
            &layer(Site::Output, features, rows, &l),
            &h,
            &probe,
            &mut dh,
            &mut [&mut dl],
        )
        .unwrap();
        let eps = 1e-2f32;
        for j in 0..features {
            let (mut up, mut down) = (l.clone(), l.clone());
            up[j] += eps;
            down[j] -= eps;
            let numeric = (loss(&h, &up, &probe) - loss(&h, &down, &probe)) / (2.0 * eps as f64);
            assert!(
                (numeric - dl[j] as f64).abs() < 1e-3,
                "dl[{j}]: {numeric} vs {}",
                dl[j]
            );
        }
        for i in 0..h.len() {
            let (mut up, mut down) = (h.clone(), h.clone());
            up[i] += eps;
            down[i] -= eps;
            let numeric = (loss(&up, &l, &probe) - loss(&down, &l, &probe)) / (2.0 * eps as f64);
            assert!(
                (numeric - dh[i] as f64).abs() < 1e-3,
                "dh[{i}]: {numeric} vs {}",
                dh[i]
            );
        }
    }

    #[test]
    fn merged_weight_reproduces_both_sites() {
        let (out_f, in_f) = (2, 3);
        let w: Vec<f32> = (0..out_f * in_f).map(|i| i as f32 + 1.0).collect();
        let x = [0.5f32, -1.0, 2.0];
        let linear = |w: &[f32], x: &[f32]| -> Vec<f32> {
            w.chunks_exact(in_f)
                .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
                .collect()
        };
        // Output site: (x W^T) * l.
        let l_out = [2.0f32, -3.0];
        let mut merged = w.clone();
        Ia3::merge(
            &layer(Site::Output, out_f, 0, &l_out),
            &mut merged,
            out_f,
            in_f,
        )
        .unwrap();
        let want: Vec<f32> = linear(&w, &x)
            .iter()
            .zip(&l_out)
            .map(|(y, l)| y * l)
            .collect();
        assert_eq!(linear(&merged, &x), want);
        // Input site: (x * l) W^T.
        let l_in = [1.0f32, 0.5, 4.0];
        let mut merged = w.clone();
        Ia3::merge(
            &layer(Site::Input, in_f, 0, &l_in),
            &mut merged,
            out_f,
            in_f,
        )
        .unwrap();
        let scaled: Vec<f32> = x.iter().zip(&l_in).map(|(x, l)| x * l).collect();
        assert_eq!(linear(&merged, &x), linear(&w, &scaled));
    }

    #[test]
    fn starts_at_ones_and_the_peft_config_is_json() {
        let mut l = vec![0f32; 5];
        Ia3::init(Site::Input, 5, 0, 7, &mut l).unwrap();
        assert_eq!(l, [1.0; 5]);
        assert!(
            Ia3::PEFT.config.trim_start().starts_with('{') && Ia3::PEFT.config.contains("\"IA3\"")
        );
    }
}
