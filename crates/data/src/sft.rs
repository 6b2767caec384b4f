//! Supervised fine-tuning samples: torchtune's `SFTDataset` output (`tokens`, `labels`, `mask`).

use anyhow::{Context, Result};

use crate::llama2_tokenizer::Llama2Tokenizer;
use crate::messages::{validate_messages, Message};

/// The label of a position excluded from the loss (torchtune's `CROSS_ENTROPY_IGNORE_IDX`).
pub const CROSS_ENTROPY_IGNORE_IDX: i64 = -100;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    /// `tokens`, with [`CROSS_ENTROPY_IGNORE_IDX`] where `mask` is true.
    pub labels: Vec<i64>,
    /// True where the token is excluded from the loss.
    pub mask: Vec<bool>,
}

/// Whether `labels` hold one the loss counts after its shift by one (`labels[1..]`): each
/// token is learnt from the ones before it, so a one-token sample has nothing to predict.
pub fn has_a_label_to_predict(labels: &[i64]) -> bool {
    labels
        .iter()
        .skip(1)
        .any(|&l| l != CROSS_ENTROPY_IGNORE_IDX)
}

impl Sample {
    /// Builds the labels from tokens and mask (torchtune: `np.where(mask, -100, tokens)`).
    ///
    /// # Panics
    /// If `tokens` and `mask` differ in length.
    pub fn from_tokens_and_mask(tokens: Vec<u32>, mask: Vec<bool>) -> Self {
        assert_eq!(
            tokens.len(),
            mask.len(),
            "tokens and mask must have the same length"
        );
        let labels = tokens
            .iter()
            .zip(&mask)
            .map(|(&t, &m)| {
                if m {
                    CROSS_ENTROPY_IGNORE_IDX
                } else {
                    i64::from(t)
                }
            })
            .collect();
        Sample {
            tokens,
            labels,
            mask,
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Labels that count in the loss (not [`CROSS_ENTROPY_IGNORE_IDX`]).
    pub fn num_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .filter(|&&l| l != CROSS_ENTROPY_IGNORE_IDX)
            .count()
    }
}

/// torchtune's `SFTDataset._prepare_sample` after the message transform: validates the
/// messages, tokenizes them with end tokens, and derives the labels.
pub fn tokenize_sft(messages: &[Message], tokenizer: &Llama2Tokenizer) -> Result<Sample> {
    validate_messages(messages).context("invalid conversation")?;
    let (tokens, mask) = tokenizer.tokenize_messages(messages, true);
    Ok(Sample::from_tokens_and_mask(tokens, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_mask() {
        let s = Sample::from_tokens_and_mask(vec![1, 5, 6, 2], vec![true, true, false, false]);
        assert_eq!(s.labels, [-100, -100, 6, 2]);
        assert_eq!(s.num_label_tokens(), 2);
        assert_eq!(s.len(), 4);
    }
}
