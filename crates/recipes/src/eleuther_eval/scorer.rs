//! Scoring continuations on a model: batched, with the shared prefix run once.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use tune_models::decoder::{Forward, KvCache};
use tune_models::TransformerDecoder;

use super::requests::Encoded;

/// One request's result: the summed log-probability of the continuation, and whether greedy
/// decoding would have produced it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub ll: f64,
    pub is_greedy: bool,
}

/// Scores requests on a model, `batch_size` rows per forward.
pub struct Scorer<'a> {
    pub model: &'a TransformerDecoder,
    /// lm-eval's `max_length`: inputs keep their last `max_length` tokens.
    pub max_length: usize,
    pub batch_size: usize,
    pub progress: &'a indicatif::ProgressBar,
}

/// A row of a batch: predictions at positions `start..start + targets.len()` are scored
/// against `targets`.
struct Row<'a> {
    start: usize,
    targets: &'a [u32],
}

impl Scorer<'_> {
    /// Scores every request. With `reuse_context`, requests that fit `max_length` are scored
    /// against cached context keys/values; the others (and all, without it) whole.
    pub fn score(&self, requests: &[Encoded], reuse_context: bool) -> Result<Vec<Score>> {
        for r in requests {
            if r.continuation.is_empty() {
                bail!(
                    "an answer encodes to no tokens (an empty answer in the TruthfulQA file?); \
                     every answer needs text"
                );
            }
        }
        // The longest answer, so that one change of max_seq_length is enough.
        let longest = requests.iter().map(|r| r.continuation.len()).max();
        if let Some(longest) = longest.filter(|&n| n > self.max_length) {
            bail!(
                "an answer of {longest} tokens cannot be scored with max_seq_length {}; set \
                 max_seq_length to at least {longest}",
                self.max_length
            );
        }
        // Inputs truncated from the left lose the shared prefix: those are always run whole.
        let (cached, whole): (Vec<usize>, Vec<usize>) = (0..requests.len())
            .partition(|&i| reuse_context && requests[i].total() <= self.max_length + 1);
        let mut scores = vec![
            Score {
                ll: f64::NAN,
                is_greedy: false
            };
            requests.len()
        ];
        if !cached.is_empty() {
            self.score_with_cached_contexts(requests, &cached, &mut scores)?;
        }
        if !whole.is_empty() {
            self.score_whole(requests, &whole, &mut scores)?;
        }
        Ok(scores)
    }

    /// lm-eval's way: input = `(context + continuation)[-(max_length + 1):][:-1]`, longest first,
    /// right-padded batches.
    fn score_whole(
        &self,
        requests: &[Encoded],
        which: &[usize],
        scores: &mut [Score],
    ) -> Result<()> {
        let mut order = which.to_vec();
        order.sort_by_key(|&i| std::cmp::Reverse(requests[i].total()));
        for chunk in order.chunks(self.batch_size) {
            let inputs: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| self.whole_input(&requests[i]))
                .collect();
            let rows: Vec<Row> = chunk
                .iter()
                .zip(&inputs)
                .map(|(&i, input)| {
                    let targets = &requests[i].continuation[..];
                    Row {
                        start: input.len() - targets.len(),
                        targets,
                    }
                })
                .collect();
            let logits = self
                .model
                .forward_with(&padded(&inputs, self.model.device())?, Forward::default())?
                .logits;
            for (&i, score) in chunk.iter().zip(score_rows(&logits, &rows)?) {
                scores[i] = score;
            }
            self.progress.inc(chunk.len() as u64);
        }
        Ok(())
    }

    fn whole_input(&self, r: &Encoded) -> Vec<u32> {
        let all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let keep = all.len().min(self.max_length + 1);
        all[all.len() - keep..all.len() - 1].to_vec()
    }

    /// The same numbers with less work: the prefix all contexts share is run once, each distinct
    /// context once more (all but its last token), then each answer (the context's last token
    /// plus the answer but its last token) against a copy of that cache.
    fn score_with_cached_contexts(
        &self,
        requests: &[Encoded],
        which: &[usize],
        scores: &mut [Score],
    ) -> Result<()> {
        let groups = group_by_context(requests, which);
        let shared = shared_prefix_len(groups.iter().map(|(ctx, _)| *ctx));
        let device = self.model.device();
        let mut base = KvCache::new();
        if shared > 0 {
            let first = groups[0].0;
            self.model
                .forward_cached(&padded(&[first[..shared].to_vec()], device)?, &mut base)?;
        }
        for (ctx, members) in &groups {
            let mut cache = base.clone();
            let own = &ctx[shared..ctx.len() - 1];
            if !own.is_empty() {
                self.model
                    .forward_cached(&padded(&[own.to_vec()], device)?, &mut cache)?;
            }
            let last = ctx[ctx.len() - 1];
            for chunk in members.chunks(self.batch_size) {
                for (&i, score) in chunk
                    .iter()
                    .zip(self.score_answers(&cache, last, requests, chunk)?)
                {
                    scores[i] = score;
                }
                self.progress.inc(chunk.len() as u64);
            }
        }
        Ok(())
    }

    /// Scores the answers `which` of one context against `cache` (the context but its `last`
    /// token): each row is `last` plus the answer but its last token.
    fn score_answers(
        &self,
        cache: &KvCache,
        last: u32,
        requests: &[Encoded],
        which: &[usize],
    ) -> Result<Vec<Score>> {
        let inputs: Vec<Vec<u32>> = which
            .iter()
            .map(|&i| {
                let cont = &requests[i].continuation;
                std::iter::once(last)
                    .chain(cont[..cont.len() - 1].iter().copied())
                    .collect()
            })
            .collect();
        let rows: Vec<Row> = which
            .iter()
            .map(|&i| Row {
                start: 0,
                targets: &requests[i].continuation,
            })
            .collect();
        let mut rows_cache = cache.repeat_batch(which.len())?;
        let logits = self
            .model
            .forward_cached(&padded(&inputs, self.model.device())?, &mut rows_cache)?;
        score_rows(&logits, &rows)
    }
}

/// Requests grouped by identical context tokens, in first-seen order.
fn group_by_context<'a>(requests: &'a [Encoded], which: &[usize]) -> Vec<(&'a [u32], Vec<usize>)> {
    let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
    let mut index: HashMap<&[u32], usize> = HashMap::new();
    for &i in which {
        let ctx = &requests[i].context[..];
        match index.get(ctx) {
            Some(&g) => groups[g].1.push(i),
            None => {
                index.insert(ctx, groups.len());
                groups.push((ctx, vec![i]));
            }
        }
    }
    groups
}

/// The longest prefix every context shares, leaving each context at least its last token.
fn shared_prefix_len<'a>(contexts: impl Iterator<Item = &'a [u32]>) -> usize {
    let mut contexts = contexts.peekable();
    let Some(first) = contexts.peek().copied() else {
        return 0;
    };
    let mut len = first.len().saturating_sub(1);
    for ctx in contexts {
        len = len.min(ctx.len().saturating_sub(1));
        len = first
            .iter()
            .zip(ctx)
            .take(len)
            .take_while(|(a, b)| a == b)
            .count();
    }
    len
}

/// Rows of ids as a [rows, longest] u32 tensor, right-padded with 0.
fn padded(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = vec![0u32; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        flat[r * width..r * width + row.len()].copy_from_slice(row);
    }
    Ok(Tensor::from_vec(flat, (rows.len(), width), device)?)
}

/// Log-softmax of `logits` [rows, seq, vocab] at each row's scored positions: the summed
/// log-probability of the targets and whether each target was the argmax.
fn score_rows(logits: &Tensor, rows: &[Row]) -> Result<Vec<Score>> {
    let lo = rows.iter().map(|r| r.start).min().unwrap_or(0);
    let hi = rows
        .iter()
        .map(|r| r.start + r.targets.len())
        .max()
        .unwrap_or(lo);
    let window = logits
        .narrow(1, lo, hi - lo)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let (n, width) = (rows.len(), hi - lo);
    let mut targets = vec![0u32; n * width];
    for (r, row) in rows.iter().enumerate() {
        let at = r * width + row.start - lo;
        targets[at..at + row.targets.len()].copy_from_slice(row.targets);
    }
    let targets_t = Tensor::from_vec(targets, (n, width, 1), window.device())?;
    let log_probs = candle_nn::ops::log_softmax(&window, D::Minus1)?;
    let picked: Vec<Vec<f32>> = log_probs.gather(&targets_t, 2)?.squeeze(2)?.to_vec2()?;
    let greedy: Vec<Vec<u32>> = window.argmax(D::Minus1)?.to_vec2()?;
    Ok(rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let range = row.start - lo..row.start - lo + row.targets.len();
            Score {
                ll: picked[r][range.clone()].iter().map(|&x| x as f64).sum(),
                is_greedy: greedy[r][range] == *row.targets,
            }
        })
        .collect())
}
