//! Deterministic batching, the part of torch's `DistributedSampler` + `DataLoader` that training
//! needs: per-epoch shuffling from a seed, splitting across data-parallel ranks, `batch_size`,
//! `drop_last`, and an explicit position so a resumed run continues with the very next batch
//! (which torchtune does not do).
//!
//! The shuffle is torch's: `DistributedSampler` draws each epoch's order with
//! `torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))`, and
//! [`torch_randperm`] reproduces that permutation exactly, so with torchtune's sampler seed (0)
//! the batches are the ones torchtune trains on.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::collate::{Batch, CollateSft};
use crate::sft::Sample;

/// Where a loader is: the next batch to produce is batch `batch` of epoch `epoch`. Save it with a
/// checkpoint and pass it back to [`BatchSampler::batches_from`] to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub batch: usize,
}

/// Which samples go into which batch, epoch by epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSampler {
    num_samples: usize,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    num_replicas: usize,
    rank: usize,
}

/// The largest dataset [`torch_randperm`] reproduces: beyond it torch switches to 64-bit draws.
pub const TORCH_RANDPERM_MAX: usize = (u32::MAX / 20) as usize;

/// `torch.randperm(n, generator=g)` on the CPU for a generator seeded with `seed`: torch seeds an
/// MT19937 with the seed's low 32 bits and swaps each position `i` with one drawn from `i..n` by
/// a 32-bit draw modulo `n - i` (for `n` below [`TORCH_RANDPERM_MAX`]).
pub fn torch_randperm(n: usize, seed: u64) -> Vec<usize> {
    debug_assert!(n < TORCH_RANDPERM_MAX);
    let mut mt = rand_mt::Mt::new(seed as u32);
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..n.saturating_sub(1) {
        let offset = mt.next_u32() as usize % (n - i);
        order.swap(i, i + offset);
    }
    order
}

impl BatchSampler {
    /// Sequential order, keeping a last partial batch, one replica.
    pub fn new(num_samples: usize, batch_size: usize) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        if num_samples >= TORCH_RANDPERM_MAX {
            bail!(
                "{num_samples} samples: more than the {TORCH_RANDPERM_MAX} whose order tune-rs \
                 draws as torch does; split the dataset"
            );
        }
        Ok(BatchSampler {
            num_samples,
            batch_size,
            shuffle: false,
            seed: 0,
            drop_last: false,
            num_replicas: 1,
            rank: 0,
        })
    }

    /// Shuffle every epoch with torch's permutation for `seed + epoch` (torchtune's recipes
    /// give their sampler the seed 0, whatever the config's `seed`).
    pub fn with_shuffle(mut self, shuffle: bool, seed: u64) -> Self {
        self.shuffle = shuffle;
        self.seed = seed;
        self
    }

    /// Drop a last batch smaller than `batch_size` (torchtune's recipes do).
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Take rank `rank`'s share of `num_replicas` (as `DistributedSampler`: the order is padded
    /// by repeating its start to a multiple of `num_replicas`, and rank r takes every
    /// `num_replicas`-th index from r).
    pub fn with_replicas(mut self, num_replicas: usize, rank: usize) -> Result<Self> {
        if num_replicas == 0 || rank >= num_replicas {
            bail!("rank {rank} is not valid for {num_replicas} replicas");
        }
        self.num_replicas = num_replicas;
        self.rank = rank;
        Ok(self)
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn num_samples(&self) -> usize {
        self.num_samples
    }

    /// The order of all samples in `epoch`, before splitting across replicas.
    pub fn order_for_epoch(&self, epoch: u64) -> Vec<usize> {
        if self.shuffle {
            torch_randperm(self.num_samples, self.seed.wrapping_add(epoch))
        } else {
            (0..self.num_samples).collect()
        }
    }

    /// This rank's sample indices for `epoch`.
    pub fn indices_for_epoch(&self, epoch: u64) -> Vec<usize> {
        let order = self.order_for_epoch(epoch);
        if self.num_replicas == 1 || order.is_empty() {
            return order;
        }
        let per_rank = order.len().div_ceil(self.num_replicas);
        let total = per_rank * self.num_replicas;
        let padded: Vec<usize> = order.iter().copied().cycle().take(total).collect();
        padded
            .into_iter()
            .skip(self.rank)
            .step_by(self.num_replicas)
            .collect()
    }

    /// Number of batches per epoch (for this rank).
    pub fn num_batches(&self) -> usize {
        let n = if self.num_replicas == 1 || self.num_samples == 0 {
            self.num_samples
        } else {
            self.num_samples.div_ceil(self.num_replicas)
        };
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Every batch of `epoch`, as sample indices.
    pub fn batches_for_epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let indices = self.indices_for_epoch(epoch);
        let mut batches: Vec<Vec<usize>> = indices
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.drop_last && batches.last().is_some_and(|b| b.len() < self.batch_size) {
            batches.pop();
        }
        batches
    }

    /// The batches of `position.epoch` from batch `position.batch` on, each with its position.
    pub fn batches_from(
        &self,
        position: LoaderPosition,
    ) -> impl Iterator<Item = (LoaderPosition, Vec<usize>)> {
        let epoch = position.epoch;
        self.batches_for_epoch(epoch)
            .into_iter()
            .enumerate()
            .skip(position.batch)
            .map(move |(batch, indices)| (LoaderPosition { epoch, batch }, indices))
    }
}

/// Samples + sampler + collate function: yields padded batches.
#[derive(Debug, Clone)]
pub struct DataLoader<'a> {
    samples: &'a [Sample],
    sampler: BatchSampler,
    collate: CollateSft,
}

impl<'a> DataLoader<'a> {
    /// `sampler` must have been made for `samples.len()` samples.
    pub fn new(samples: &'a [Sample], sampler: BatchSampler, collate: CollateSft) -> Result<Self> {
        if sampler.num_samples() != samples.len() {
            bail!(
                "the sampler is for {} samples but the dataset has {}",
                sampler.num_samples(),
                samples.len()
            );
        }
        Ok(DataLoader {
            samples,
            sampler,
            collate,
        })
    }

    pub fn sampler(&self) -> &BatchSampler {
        &self.sampler
    }

    pub fn num_batches(&self) -> usize {
        self.sampler.num_batches()
    }

    /// The padded batches of an epoch from `position` on; each comes with its own position
    /// (save `LoaderPosition { batch: pos.batch + 1, ..pos }` after training on it to resume after it).
    pub fn batches_from(
        &self,
        position: LoaderPosition,
    ) -> impl Iterator<Item = (LoaderPosition, Batch)> + '_ {
        self.sampler.batches_from(position).map(move |(pos, idx)| {
            (
                pos,
                self.collate.collate(idx.iter().map(|&i| &self.samples[i])),
            )
        })
    }

    /// All padded batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> impl Iterator<Item = Batch> + '_ {
        self.batches_from(LoaderPosition { epoch, batch: 0 })
            .map(|(_, b)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_batches_with_and_without_drop_last() {
        let s = BatchSampler::new(5, 2).unwrap();
        assert_eq!(s.batches_for_epoch(0), [vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(s.num_batches(), 3);
        let s = s.with_drop_last(true);
        assert_eq!(s.batches_for_epoch(3), [vec![0, 1], vec![2, 3]]);
        assert_eq!(s.num_batches(), 2);
        assert!(BatchSampler::new(5, 0).is_err());
    }

    #[test]
    fn shuffle_is_a_seeded_permutation_per_epoch() {
        let s = BatchSampler::new(100, 8).unwrap().with_shuffle(true, 42);
        let e0 = s.order_for_epoch(0);
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(e0, (0..100).collect::<Vec<_>>());
        assert_eq!(e0, s.order_for_epoch(0));
        assert_ne!(e0, s.order_for_epoch(1));
        assert_ne!(
            e0,
            BatchSampler::new(100, 8)
                .unwrap()
                .with_shuffle(true, 43)
                .order_for_epoch(0)
        );
    }

    #[test]
    fn resuming_continues_with_the_next_batch() {
        let s = BatchSampler::new(10, 3).unwrap().with_shuffle(true, 7);
        let all = s.batches_for_epoch(2);
        let resumed: Vec<_> = s
            .batches_from(LoaderPosition { epoch: 2, batch: 2 })
            .collect();
        assert_eq!(resumed.len(), all.len() - 2);
        assert_eq!(
            resumed[0],
            (LoaderPosition { epoch: 2, batch: 2 }, all[2].clone())
        );
        assert_eq!(resumed.last().unwrap().1, *all.last().unwrap());
    }

    #[test]
    fn replicas_split_like_distributed_sampler() {
        let base = BatchSampler::new(5, 1).unwrap();
        let r0 = base
            .clone()
            .with_replicas(2, 0)
            .unwrap()
            .indices_for_epoch(0);
        let r1 = base
            .clone()
            .with_replicas(2, 1)
            .unwrap()
            .indices_for_epoch(0);
        assert_eq!(r0, [0, 2, 4]);
        assert_eq!(r1, [1, 3, 0]);
        assert_eq!(base.clone().with_replicas(2, 1).unwrap().num_batches(), 3);
        assert!(base.with_replicas(2, 2).is_err());
    }
}
