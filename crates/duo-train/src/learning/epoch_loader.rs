//! A burn-train data loader whose batches are a pure function of the batch's index in the run: a
//! resumed run sees exactly the batches an uninterrupted one would have (burn's loaders do not
//! checkpoint their position or their sampler's RNG).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::Dataset;
use burn::prelude::*;

/// The batch with a given index in the run, on a device.
type MakeBatch<D, O> = dyn Fn(usize, &D) -> O + Send + Sync;

/// Epochs of `batches` batches: epoch e (0-based, counted over the whole run) yields batches
/// e·batches … (e + 1)·batches − 1. The epoch a call to `iter` serves is a counter shared by every
/// copy of the loader, starting at the epoch the run resumes from.
pub struct EpochLoader<B: Backend, O> {
    make: Arc<MakeBatch<B::Device, O>>,
    /// Items per batch, for burn's progress only.
    batch_size: usize,
    batches: usize,
    next_epoch: Arc<AtomicUsize>,
    range: std::ops::Range<usize>,
    device: B::Device,
}

impl<B: Backend, O> Clone for EpochLoader<B, O> {
    fn clone(&self) -> Self {
        Self {
            make: self.make.clone(),
            batch_size: self.batch_size,
            batches: self.batches,
            next_epoch: self.next_epoch.clone(),
            range: self.range.clone(),
            device: self.device.clone(),
        }
    }
}

impl<B: Backend, O> EpochLoader<B, O> {
    pub fn new(
        make: impl Fn(usize, &B::Device) -> O + Send + Sync + 'static,
        batch_size: usize,
        batches: usize,
        first_epoch: usize,
        device: B::Device,
    ) -> Self {
        Self {
            make: Arc::new(make),
            batch_size,
            batches,
            next_epoch: Arc::new(AtomicUsize::new(first_epoch)),
            range: 0..batches,
            device,
        }
    }

    /// Batch g is `dataset`'s items g·batch_size … (g + 1)·batch_size − 1 through `batcher`, so no
    /// item repeats.
    pub fn from_dataset<I>(
        dataset: impl Dataset<I> + 'static,
        batcher: impl Batcher<B, I, O> + 'static,
        batch_size: usize,
        batches: usize,
        first_epoch: usize,
        device: B::Device,
    ) -> Self {
        let make = move |g: usize, device: &B::Device| {
            let items = (g * batch_size..(g + 1) * batch_size).filter_map(|i| dataset.get(i)).collect();
            batcher.batch(items, device)
        };
        Self::new(make, batch_size, batches, first_epoch, device)
    }
}

struct EpochIter<'a, B: Backend, O> {
    loader: &'a EpochLoader<B, O>,
    /// The run's index of the epoch's first batch.
    first_batch: usize,
    next: usize,
}

impl<B: Backend, O> Iterator for EpochIter<'_, B, O> {
    type Item = O;

    fn next(&mut self) -> Option<O> {
        let l = self.loader;
        if self.next >= l.range.end {
            return None;
        }
        let batch = (l.make)(self.first_batch + self.next, &l.device);
        self.next += 1;
        Some(batch)
    }
}

impl<B: Backend, O> DataLoaderIterator<O> for EpochIter<'_, B, O> {
    fn progress(&self) -> Progress {
        let l = self.loader;
        Progress::new((self.next - l.range.start) * l.batch_size, l.range.len() * l.batch_size)
    }
}

impl<B: Backend, O: 'static> DataLoader<B, O> for EpochLoader<B, O> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        let first_batch = self.next_epoch.fetch_add(1, Ordering::SeqCst) * self.batches;
        Box::new(EpochIter { loader: self, first_batch, next: self.range.start })
    }

    fn num_items(&self) -> usize {
        self.range.len() * self.batch_size
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, O>> {
        Arc::new(Self { device: device.clone(), ..self.clone() })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, O>> {
        let range = (self.range.start + start / self.batch_size)
            ..(self.range.start + end.div_ceil(self.batch_size)).min(self.range.end);
        Arc::new(Self { range, ..self.clone() })
    }
}
