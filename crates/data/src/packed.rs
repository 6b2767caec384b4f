//! Sample packing (`packed: True`), as torchtune's `PackedDataset` does it: samples are laid end
//! to end, in order, into packs of exactly `max_seq_len` tokens, so a batch has no padding
//! beyond each pack's tail. Every pack remembers where its samples start (`seq_lens`) and each
//! token's position inside its sample (`input_pos`), so the model can restart RoPE positions and
//! keep samples from attending to one another.
//!
//! A sample that does not fit the rest of a pack either starts the next pack
//! (`split_across_pack: false`, the SFT datasets) or is cut at the pack's end and continued in
//! the next one (`true`, text completion; the continuation keeps counting positions).
//! The pack's tail is padded: tokens with the padding id, labels ignored, positions continuing
//! (capped at `max_seq_len - 1`), and the padding counted as one more "sample" in `seq_lens`.

use anyhow::{bail, Result};

use crate::collate::{Batch, CollateSft, PackedLayout};
use crate::sft::{has_a_label_to_predict, Sample, CROSS_ENTROPY_IGNORE_IDX};

/// One pack of `max_seq_len` tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pack {
    pub tokens: Vec<u32>,
    pub labels: Vec<i64>,
    /// Each token's position inside its sample.
    pub input_pos: Vec<u32>,
    /// The lengths of the samples in the pack, in order (the padding last); they sum to
    /// `max_seq_len`.
    pub seq_lens: Vec<usize>,
}

impl Pack {
    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn push(&mut self, sample: &Sample, max_seq_len: usize) {
        self.tokens.extend(&sample.tokens);
        self.labels.extend(&sample.labels);
        self.input_pos
            .extend((0..sample.len()).map(|p| (p % max_seq_len) as u32));
        self.seq_lens.push(sample.len());
    }

    /// Splits at token `at`: `self` keeps `..at` with `seq_lens`, the rest is returned with one
    /// sample of length `rest_len`.
    fn split_off(&mut self, at: usize, seq_lens: Vec<usize>, rest_len: usize) -> Pack {
        let rest = Pack {
            tokens: self.tokens.split_off(at),
            labels: self.labels.split_off(at),
            input_pos: self.input_pos.split_off(at),
            seq_lens: vec![rest_len],
        };
        self.seq_lens = seq_lens;
        rest
    }

    fn padded(mut self, max_seq_len: usize, padding_idx: u32) -> Pack {
        let padding = max_seq_len - self.len();
        if padding == 0 {
            return self;
        }
        let last = self.input_pos.last().copied().unwrap_or(0);
        let cap = (max_seq_len - 1) as u32;
        self.tokens.resize(max_seq_len, padding_idx);
        self.labels.resize(max_seq_len, CROSS_ENTROPY_IGNORE_IDX);
        self.input_pos
            .extend((1..=padding as u32).map(|i| (last + i).min(cap)));
        self.seq_lens.push(padding);
        self
    }
}

/// Packs `samples` greedily, in order, into packs of `max_seq_len` tokens.
pub fn pack_samples(
    samples: &[Sample],
    max_seq_len: usize,
    split_across_pack: bool,
    padding_idx: u32,
) -> Result<Vec<Pack>> {
    if max_seq_len == 0 {
        bail!("cannot pack into sequences of length 0; set tokenizer.max_seq_len");
    }
    let mut packs = Vec::new();
    let mut current = Pack::default();
    for (index, sample) in samples.iter().enumerate() {
        if sample.len() > max_seq_len && !split_across_pack {
            bail!(
                "sample {index} has {} tokens, more than the pack length {max_seq_len} \
                 (tokenizer.max_seq_len); raise tokenizer.max_seq_len or shorten the sample",
                sample.len()
            );
        }
        // Where the pack ended before this sample: the cut when the sample moves on whole.
        let boundary = current.len();
        current.push(sample, max_seq_len);
        while current.len() > max_seq_len {
            let earlier = current.seq_lens[..current.seq_lens.len() - 1].to_vec();
            let mut full = current;
            current = if split_across_pack {
                let mut seq_lens = earlier;
                let room = max_seq_len - seq_lens.iter().sum::<usize>();
                if room > 0 {
                    seq_lens.push(room);
                }
                let rest_len = full.len() - max_seq_len;
                full.split_off(max_seq_len, seq_lens, rest_len)
            } else {
                let moved = *full.seq_lens.last().expect("the sample just pushed");
                full.split_off(boundary, earlier, moved)
            };
            packs.push(full.padded(max_seq_len, padding_idx));
        }
    }
    if current.len() > 0 {
        packs.push(current.padded(max_seq_len, padding_idx));
    }
    Ok(packs)
}

/// What the recipe trains on: tokenized samples padded per batch, or packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Examples {
    Samples(Vec<Sample>),
    Packs(Vec<Pack>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Samples(s) => s.len(),
            Examples::Packs(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many examples have no labelled token after their shift by one (`labels[1..]`): a
    /// one-token sample has nothing to predict.
    pub fn without_a_label_to_predict(&self) -> usize {
        match self {
            Examples::Samples(samples) => samples
                .iter()
                .filter(|s| !has_a_label_to_predict(&s.labels))
                .count(),
            Examples::Packs(packs) => packs
                .iter()
                .filter(|p| !has_a_label_to_predict(&p.labels))
                .count(),
        }
    }

    /// The batch of examples `indices`: samples through `collate` (`padded_collate_sft`), packs
    /// stacked as they are (torchtune's `padded_collate_packed`; packs need no padding).
    pub fn collate(&self, indices: &[usize], collate: &CollateSft) -> Batch {
        match self {
            Examples::Samples(samples) => collate.collate(indices.iter().map(|&i| &samples[i])),
            Examples::Packs(packs) => padded_collate_packed(indices.iter().map(|&i| &packs[i])),
        }
    }
}

/// torchtune's `padded_collate_packed`: packs stacked into a batch, keeping their layout.
pub fn padded_collate_packed<'a>(packs: impl IntoIterator<Item = &'a Pack>) -> Batch {
    let mut batch = Batch::default();
    let mut layout = PackedLayout::default();
    for pack in packs {
        batch
            .tokens
            .push(pack.tokens.iter().map(|&t| i64::from(t)).collect());
        batch.labels.push(pack.labels.clone());
        layout.input_pos.push(pack.input_pos.clone());
        layout.seq_lens.push(pack.seq_lens.clone());
    }
    batch.packed = Some(layout);
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample of `n` tokens `first, first + 1, ...`, every label counted.
    fn sample(first: u32, n: usize) -> Sample {
        let tokens: Vec<u32> = (first..first + n as u32).collect();
        Sample::from_tokens_and_mask(tokens, vec![false; n])
    }

    #[test]
    fn whole_samples_move_to_the_next_pack() {
        // torchtune's docstring example: max_seq_len 6, samples of 3, 2, 2, 2 tokens.
        let samples = [sample(10, 3), sample(20, 2), sample(30, 2), sample(40, 2)];
        let packs = pack_samples(&samples, 6, false, 0).unwrap();
        assert_eq!(packs.len(), 2);
        assert_eq!(packs[0].tokens, [10, 11, 12, 20, 21, 0]);
        assert_eq!(packs[0].labels, [10, 11, 12, 20, 21, -100]);
        assert_eq!(packs[0].input_pos, [0, 1, 2, 0, 1, 2]);
        assert_eq!(packs[0].seq_lens, [3, 2, 1]);
        assert_eq!(packs[1].tokens, [30, 31, 40, 41, 0, 0]);
        assert_eq!(packs[1].input_pos, [0, 1, 0, 1, 2, 3]);
        assert_eq!(packs[1].seq_lens, [2, 2, 2]);
    }

    #[test]
    fn split_samples_continue_their_positions_in_the_next_pack() {
        let samples = [sample(10, 4), sample(20, 5)];
        let packs = pack_samples(&samples, 6, true, 0).unwrap();
        assert_eq!(packs.len(), 2);
        assert_eq!(packs[0].tokens, [10, 11, 12, 13, 20, 21]);
        assert_eq!(packs[0].input_pos, [0, 1, 2, 3, 0, 1]);
        assert_eq!(packs[0].seq_lens, [4, 2]);
        assert_eq!(packs[1].tokens, [22, 23, 24, 0, 0, 0]);
        assert_eq!(
            packs[1].input_pos,
            [2, 3, 4, 5, 5, 5],
            "padding positions stop at max_seq_len - 1"
        );
        assert_eq!(packs[1].seq_lens, [3, 3]);
    }

    #[test]
    fn a_long_sample_spans_several_packs_when_splitting() {
        let packs = pack_samples(&[sample(0, 9), sample(50, 1)], 4, true, 7).unwrap();
        let tokens: Vec<Vec<u32>> = packs.iter().map(|p| p.tokens.clone()).collect();
        assert_eq!(
            tokens,
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 50, 7, 7]]
        );
        assert_eq!(
            packs[1].input_pos,
            [0, 1, 2, 3],
            "positions wrap at max_seq_len"
        );
        assert_eq!(packs[1].seq_lens, [4]);
        assert_eq!(packs[2].seq_lens, [1, 1, 2]);
        for p in &packs {
            assert_eq!(p.seq_lens.iter().sum::<usize>(), 4);
        }
    }

    #[test]
    fn exact_fits_and_too_long_samples() {
        let packs = pack_samples(&[sample(0, 3), sample(10, 3)], 3, false, 0).unwrap();
        assert_eq!(packs.len(), 2);
        assert_eq!(packs[1].tokens, [10, 11, 12]);
        assert_eq!(packs[1].seq_lens, [3]);
        let err = pack_samples(&[sample(0, 2), sample(0, 4)], 3, false, 0).unwrap_err();
        assert!(err.to_string().contains("sample 1 has 4 tokens"), "{err}");
    }

    #[test]
    fn collated_packs_keep_their_layout() {
        let packs = pack_samples(&[sample(1, 2), sample(5, 3)], 4, false, 0).unwrap();
        let examples = Examples::Packs(packs);
        let batch = examples.collate(&[1, 0], &CollateSft::default());
        assert_eq!(batch.tokens, [vec![5, 6, 7, 0], vec![1, 2, 0, 0]]);
        let layout = batch.packed.unwrap();
        assert_eq!(layout.seq_lens, [vec![3, 1], vec![2, 2]]);
        assert_eq!(layout.input_pos, [vec![0, 1, 2, 3], vec![0, 1, 2, 3]]);
    }
}
