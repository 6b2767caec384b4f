//! torchtune's `padded_collate_sft`: right-pads a batch of samples to its longest sequence,
//! tokens with `padding_idx` and labels with `ignore_idx`, as int64 rows.

use anyhow::{bail, Result};
use tune_core::{ArgSpec, ArgType, Args};

use crate::sft::{Sample, CROSS_ENTROPY_IGNORE_IDX};

/// A padded batch: `tokens` and `labels` are `[batch_size][seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    pub tokens: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    /// Set for a batch of packs: where each row's samples start and their token positions.
    pub packed: Option<PackedLayout>,
}

/// The sample layout of a batch of packs (see [`crate::packed`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedLayout {
    /// `[batch_size][seq_len]`: each token's position inside its sample.
    pub input_pos: Vec<Vec<u32>>,
    /// Per row, the lengths of its samples in order (summing to `seq_len`).
    pub seq_lens: Vec<Vec<usize>>,
}

impl Batch {
    pub fn batch_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn seq_len(&self) -> usize {
        self.tokens.first().map_or(0, Vec::len)
    }

    /// `(batch_size, seq_len)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.batch_size(), self.seq_len())
    }

    /// Tokens in row-major order (for building a `[batch, seq]` tensor).
    pub fn tokens_flat(&self) -> Vec<i64> {
        self.tokens.concat()
    }

    /// Labels in row-major order.
    pub fn labels_flat(&self) -> Vec<i64> {
        self.labels.concat()
    }

    /// Labels that are not `ignore_idx` (counted before any shift).
    pub fn num_label_tokens(&self, ignore_idx: i64) -> usize {
        self.labels
            .iter()
            .flatten()
            .filter(|&&l| l != ignore_idx)
            .count()
    }
}

/// `padded_collate_sft(batch, padding_idx, ignore_idx)` with `pad_to_multiple_of = 1`.
pub fn padded_collate_sft<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
    padding_idx: i64,
    ignore_idx: i64,
) -> Batch {
    CollateSft {
        padding_idx,
        ignore_idx,
        pad_to_multiple_of: 1,
    }
    .collate(samples)
}

/// The `padded_collate_sft` component: its arguments, and [`CollateSft::collate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateSft {
    pub padding_idx: i64,
    pub ignore_idx: i64,
    /// Pad the length up to a multiple of this (1: the longest sample's length). Unlike
    /// torchtune 0.6.1, a length that already is a multiple gets no extra padding.
    pub pad_to_multiple_of: usize,
}

impl Default for CollateSft {
    fn default() -> Self {
        CollateSft {
            padding_idx: 0,
            ignore_idx: CROSS_ENTROPY_IGNORE_IDX,
            pad_to_multiple_of: 1,
        }
    }
}

impl CollateSft {
    pub fn from_args(args: &Args) -> Result<Self> {
        let d = CollateSft::default();
        let padding_idx = args.get_opt("padding_idx")?.unwrap_or(d.padding_idx);
        let ignore_idx = args.get_opt("ignore_idx")?.unwrap_or(d.ignore_idx);
        let multiple: i64 = args.get_opt("pad_to_multiple_of")?.unwrap_or(1);
        if multiple < 1 {
            bail!("padded_collate_sft.pad_to_multiple_of must be at least 1, got {multiple}");
        }
        Ok(CollateSft {
            padding_idx,
            ignore_idx,
            pad_to_multiple_of: multiple as usize,
        })
    }

    /// Pads every sample to the batch's longest sequence (rounded up to `pad_to_multiple_of`).
    pub fn collate<'a>(&self, samples: impl IntoIterator<Item = &'a Sample>) -> Batch {
        let samples: Vec<&Sample> = samples.into_iter().collect();
        let longest = samples
            .iter()
            .map(|s| s.tokens.len().max(s.labels.len()))
            .max()
            .unwrap_or(0);
        let m = self.pad_to_multiple_of.max(1);
        let len = longest.div_ceil(m) * m;
        let mut batch = Batch {
            tokens: Vec::with_capacity(samples.len()),
            labels: Vec::with_capacity(samples.len()),
            packed: None,
        };
        for s in samples {
            let mut tokens: Vec<i64> = s.tokens.iter().map(|&t| i64::from(t)).collect();
            tokens.resize(len, self.padding_idx);
            let mut labels = s.labels.clone();
            labels.resize(len, self.ignore_idx);
            batch.tokens.push(tokens);
            batch.labels.push(labels);
        }
        batch
    }
}

tune_core::inventory::submit! {
    tune_core::Component {
        path: "torchtune.data.padded_collate_sft",
        aliases: &["padded_collate_sft"],
        kind: tune_core::ComponentKind::Collator,
        args: &[
            ArgSpec::optional("padding_idx", ArgType::Int, "0"),
            ArgSpec::optional("ignore_idx", ArgType::Int, "-100"),
            ArgSpec::optional("pad_to_multiple_of", ArgType::Int, "1"),
        ],
        extra_args: false,
        about: "Right-pads tokens with padding_idx and labels with ignore_idx to the batch's longest sample",
        origin: "built-in",
        build: |args| Ok(Box::new(CollateSft::from_args(args)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_right_to_the_longest() {
        let a = Sample::from_tokens_and_mask(vec![1, 2, 3], vec![true, false, false]);
        let b = Sample::from_tokens_and_mask(vec![7], vec![false]);
        let batch = padded_collate_sft([&a, &b], 0, -100);
        assert_eq!(batch.tokens, [vec![1, 2, 3], vec![7, 0, 0]]);
        assert_eq!(batch.labels, [vec![-100, 2, 3], vec![7, -100, -100]]);
        assert_eq!(batch.shape(), (2, 3));
        assert_eq!(batch.num_label_tokens(-100), 3);
        assert_eq!(batch.tokens_flat(), [1, 2, 3, 7, 0, 0]);
        let c = CollateSft {
            pad_to_multiple_of: 4,
            ..CollateSft::default()
        }
        .collate([&a, &b]);
        assert_eq!(c.shape(), (2, 4));
        let d = CollateSft {
            pad_to_multiple_of: 3,
            ..CollateSft::default()
        }
        .collate([&a, &b]);
        assert_eq!(d.shape(), (2, 3));
        assert_eq!(padded_collate_sft([], 0, -100).shape(), (0, 0));
    }
}
