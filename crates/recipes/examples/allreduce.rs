//! What one optimizer step's gradient all-reduce costs in `lora_finetune_distributed`: ranks are
//! threads joined over loopback TCP exactly as worker processes are, summing a gradient the size
//! of a LoRA config's trainable parameters, as tensors of one LoRA matrix each (rank 8 x 4096)
//! through `ProcessGroup::all_reduce_tensors`. `RAW=1` times the f32 all-reduce of one flat
//! buffer instead (the transport alone).
//!
//! ```text
//! cargo run --release -p tune-recipes --example allreduce -- [RANKS] [VALUES] [REPEATS]
//! # defaults: 2 ranks, 17,891,328 values (llama2/7B_lora: q/v/output_proj + MLP, rank 8), 5 repeats
//! ```
//!
//! Prints one JSON line: seconds per all-reduce (best and mean) and the payload per rank.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde_json::json;
use tune_recipes::distributed::{ProcessGroup, RankInfo};

/// Values in one LoRA matrix of the 7B config (rank 8 x dim 4096).
const LORA_MATRIX: usize = 8 * 4096;

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let ranks = args.first().copied().unwrap_or(2);
    let values = args.get(1).copied().unwrap_or(17_891_328);
    let repeats = args.get(2).copied().unwrap_or(5);

    let endpoint = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("127.0.0.1:{}", listener.local_addr()?.port())
    };
    let workers: Vec<_> = (0..ranks)
        .map(|rank| {
            let endpoint = endpoint.clone();
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let info = RankInfo {
                    rank,
                    world_size: ranks,
                    local_rank: rank,
                };
                let mut group = ProcessGroup::connect(info, &endpoint, Duration::from_secs(60))?;
                // LoRA gradients come as many small matrices: rank 8 x dim 4096 each.
                let gradient: Vec<Tensor> = (0..values.div_ceil(LORA_MATRIX))
                    .map(|i| {
                        let n = LORA_MATRIX.min(values - i * LORA_MATRIX);
                        Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)
                    })
                    .collect::<candle_core::Result<_>>()?;
                let mut seconds = Vec::new();
                if std::env::var_os("RAW").is_some() {
                    for _ in 0..repeats {
                        let mut flat = vec![1f32; values];
                        group.barrier()?;
                        let started = Instant::now();
                        group.all_reduce_sum_f32(&mut flat)?;
                        seconds.push(started.elapsed().as_secs_f64());
                    }
                    return Ok(seconds);
                }
                for _ in 0..repeats {
                    let mut grads = gradient.clone();
                    group.barrier()?;
                    let started = Instant::now();
                    group.all_reduce_tensors(&mut grads)?;
                    seconds.push(started.elapsed().as_secs_f64());
                    let first: f32 = grads[0].get(0)?.to_scalar()?;
                    anyhow::ensure!(first == ranks as f32, "wrong sum {first}");
                }
                Ok(seconds)
            })
        })
        .collect();
    let mut per_rank = Vec::new();
    for worker in workers {
        per_rank.push(worker.join().expect("rank thread")?);
    }
    // A collective ends when its slowest rank has the result.
    let slowest: Vec<f64> = (0..repeats)
        .map(|i| per_rank.iter().map(|s| s[i]).fold(0.0, f64::max))
        .collect();
    let best = slowest.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = slowest.iter().sum::<f64>() / repeats as f64;
    println!(
        "{}",
        json!({
            "ranks": ranks,
            "values": values,
            "payload_mib_per_rank": values as f64 * 4.0 / (1 << 20) as f64,
            "best_s": best,
            "mean_s": mean,
        })
    );
    Ok(())
}
