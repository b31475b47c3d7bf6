//! A burn-train data loader whose batches are a pure function of (epoch, batch index): a resumed
//! run sees exactly the batches an uninterrupted one would have (burn's loaders do not checkpoint
//! their position or their sampler's RNG).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::Dataset;
use burn::prelude::*;

/// Epochs of `batches` batches of `batch_size` consecutive items of `dataset`: epoch e (0-based,
/// counted over the whole run) takes items from e·batches·batch_size on, so no item repeats. The
/// epoch a call to `iter` serves is a counter shared by every copy of the loader, starting at the
/// epoch the run resumes from.
pub struct EpochLoader<B: Backend, I, O> {
    dataset: Arc<dyn Dataset<I>>,
    batcher: Arc<dyn Batcher<B, I, O>>,
    batch_size: usize,
    batches: usize,
    next_epoch: Arc<AtomicUsize>,
    range: std::ops::Range<usize>,
    device: B::Device,
}

impl<B: Backend, I, O> Clone for EpochLoader<B, I, O> {
    fn clone(&self) -> Self {
        Self {
            dataset: self.dataset.clone(),
            batcher: self.batcher.clone(),
            batch_size: self.batch_size,
            batches: self.batches,
            next_epoch: self.next_epoch.clone(),
            range: self.range.clone(),
            device: self.device.clone(),
        }
    }
}

impl<B: Backend, I, O> EpochLoader<B, I, O> {
    pub fn new(
        dataset: impl Dataset<I> + 'static,
        batcher: impl Batcher<B, I, O> + 'static,
        batch_size: usize,
        batches: usize,
        first_epoch: usize,
        device: B::Device,
    ) -> Self {
        Self {
            dataset: Arc::new(dataset),
            batcher: Arc::new(batcher),
            batch_size,
            batches,
            next_epoch: Arc::new(AtomicUsize::new(first_epoch)),
            range: 0..batches,
            device,
        }
    }
}

struct EpochIter<'a, B: Backend, I, O> {
    loader: &'a EpochLoader<B, I, O>,
    first_item: usize,
    next: usize,
}

impl<B: Backend, I, O> Iterator for EpochIter<'_, B, I, O> {
    type Item = O;

    fn next(&mut self) -> Option<O> {
        let l = self.loader;
        if self.next >= l.range.end {
            return None;
        }
        let start = self.first_item + self.next * l.batch_size;
        self.next += 1;
        let items: Vec<I> = (start..start + l.batch_size).filter_map(|i| l.dataset.get(i)).collect();
        Some(l.batcher.batch(items, &l.device))
    }
}

impl<B: Backend, I, O> DataLoaderIterator<O> for EpochIter<'_, B, I, O> {
    fn progress(&self) -> Progress {
        let l = self.loader;
        Progress::new((self.next - l.range.start) * l.batch_size, l.range.len() * l.batch_size)
    }
}

impl<B: Backend, I: Send + Sync + 'static, O: 'static> DataLoader<B, O> for EpochLoader<B, I, O> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        let first_item = epoch * self.batches * self.batch_size;
        Box::new(EpochIter { loader: self, first_item, next: self.range.start })
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
