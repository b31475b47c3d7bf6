//! pytorch-fid's InceptionV3 (its "FID Inception": the TensorFlow graph's weights, with the FID
//! variants of blocks A, C and E), up to the 2,048 pool features FID compares. Field names follow
//! torchvision's `Inception3` keys (`Mixed_5b.branch1x1.conv.weight`, lower-cased where Rust
//! requires; the loader maps them).

use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// BatchNorm in inference: the stored running statistics, eps 0.001 (TensorFlow's).
#[derive(Module, Debug)]
pub struct FrozenNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: Param<Tensor<B, 1>>,
    pub running_var: Param<Tensor<B, 1>>,
}

/// conv (no bias) → BatchNorm → ReLU.
#[derive(Module, Debug)]
pub struct BasicConv<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: FrozenNorm<B>,
}

impl<B: Backend> BasicConv<B> {
    fn new(
        c: [usize; 2],
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
        device: &B::Device,
    ) -> Self {
        let [ph, pw] = padding;
        let conv = Conv2dConfig::new(c, kernel)
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(ph, pw, ph, pw))
            .with_bias(false)
            .init(device);
        let ones = || Param::from_tensor(Tensor::ones([c[1]], device));
        let zeros = || Param::from_tensor(Tensor::zeros([c[1]], device));
        Self {
            conv,
            bn: FrozenNorm { weight: ones(), bias: zeros(), running_mean: zeros(), running_var: ones() },
        }
    }

    fn square(c_in: usize, c_out: usize, k: usize, stride: usize, pad: usize, device: &B::Device) -> Self {
        Self::new([c_in, c_out], [k, k], stride, [pad, pad], device)
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.conv.forward(x);
        let c = x.dims()[1];
        let per_channel = |p: &Param<Tensor<B, 1>>| p.val().reshape([1, c, 1, 1]);
        let scale = per_channel(&self.bn.weight) / (per_channel(&self.bn.running_var) + 1e-3).sqrt();
        relu((x - per_channel(&self.bn.running_mean)) * scale + per_channel(&self.bn.bias))
    }
}

/// The FID blocks' 3×3 average pool, which leaves the padding out of the mean.
fn average_pool() -> AvgPool2d {
    AvgPool2dConfig::new([3, 3])
        .with_strides([1, 1])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_count_include_pad(false)
        .init()
}

fn max_pool(stride: usize, pad: usize) -> MaxPool2d {
    MaxPool2dConfig::new([3, 3])
        .with_strides([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init()
}

#[derive(Module, Debug)]
pub struct InceptionA<B: Backend> {
    pub branch1x1: BasicConv<B>,
    pub branch5x5_1: BasicConv<B>,
    pub branch5x5_2: BasicConv<B>,
    pub branch3x3dbl_1: BasicConv<B>,
    pub branch3x3dbl_2: BasicConv<B>,
    pub branch3x3dbl_3: BasicConv<B>,
    pub branch_pool: BasicConv<B>,
    pool: AvgPool2d,
}

impl<B: Backend> InceptionA<B> {
    fn new(c: usize, pool_features: usize, d: &B::Device) -> Self {
        Self {
            branch1x1: BasicConv::square(c, 64, 1, 1, 0, d),
            branch5x5_1: BasicConv::square(c, 48, 1, 1, 0, d),
            branch5x5_2: BasicConv::square(48, 64, 5, 1, 2, d),
            branch3x3dbl_1: BasicConv::square(c, 64, 1, 1, 0, d),
            branch3x3dbl_2: BasicConv::square(64, 96, 3, 1, 1, d),
            branch3x3dbl_3: BasicConv::square(96, 96, 3, 1, 1, d),
            branch_pool: BasicConv::square(c, pool_features, 1, 1, 0, d),
            pool: average_pool(),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b5 = self.branch5x5_2.forward(self.branch5x5_1.forward(x.clone()));
        let b3 = self.branch3x3dbl_1.forward(x.clone());
        let b3 = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(b3));
        let bp = self.branch_pool.forward(self.pool.forward(x));
        Tensor::cat(vec![b1, b5, b3, bp], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionB<B: Backend> {
    pub branch3x3: BasicConv<B>,
    pub branch3x3dbl_1: BasicConv<B>,
    pub branch3x3dbl_2: BasicConv<B>,
    pub branch3x3dbl_3: BasicConv<B>,
    pool: MaxPool2d,
}

impl<B: Backend> InceptionB<B> {
    fn new(c: usize, d: &B::Device) -> Self {
        Self {
            branch3x3: BasicConv::square(c, 384, 3, 2, 0, d),
            branch3x3dbl_1: BasicConv::square(c, 64, 1, 1, 0, d),
            branch3x3dbl_2: BasicConv::square(64, 96, 3, 1, 1, d),
            branch3x3dbl_3: BasicConv::square(96, 96, 3, 2, 0, d),
            pool: max_pool(2, 0),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3.forward(x.clone());
        let bd = self.branch3x3dbl_1.forward(x.clone());
        let bd = self.branch3x3dbl_3.forward(self.branch3x3dbl_2.forward(bd));
        Tensor::cat(vec![b3, bd, self.pool.forward(x)], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionC<B: Backend> {
    pub branch1x1: BasicConv<B>,
    pub branch7x7_1: BasicConv<B>,
    pub branch7x7_2: BasicConv<B>,
    pub branch7x7_3: BasicConv<B>,
    pub branch7x7dbl_1: BasicConv<B>,
    pub branch7x7dbl_2: BasicConv<B>,
    pub branch7x7dbl_3: BasicConv<B>,
    pub branch7x7dbl_4: BasicConv<B>,
    pub branch7x7dbl_5: BasicConv<B>,
    pub branch_pool: BasicConv<B>,
    pool: AvgPool2d,
}

impl<B: Backend> InceptionC<B> {
    fn new(c: usize, c7: usize, d: &B::Device) -> Self {
        let row = |i, o| BasicConv::new([i, o], [1, 7], 1, [0, 3], d);
        let column = |i, o| BasicConv::new([i, o], [7, 1], 1, [3, 0], d);
        Self {
            branch1x1: BasicConv::square(c, 192, 1, 1, 0, d),
            branch7x7_1: BasicConv::square(c, c7, 1, 1, 0, d),
            branch7x7_2: row(c7, c7),
            branch7x7_3: column(c7, 192),
            branch7x7dbl_1: BasicConv::square(c, c7, 1, 1, 0, d),
            branch7x7dbl_2: column(c7, c7),
            branch7x7dbl_3: row(c7, c7),
            branch7x7dbl_4: column(c7, c7),
            branch7x7dbl_5: row(c7, 192),
            branch_pool: BasicConv::square(c, 192, 1, 1, 0, d),
            pool: average_pool(),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b7 = self.branch7x7_1.forward(x.clone());
        let b7 = self.branch7x7_3.forward(self.branch7x7_2.forward(b7));
        let bd = self.branch7x7dbl_1.forward(x.clone());
        let bd = self.branch7x7dbl_3.forward(self.branch7x7dbl_2.forward(bd));
        let bd = self.branch7x7dbl_5.forward(self.branch7x7dbl_4.forward(bd));
        let bp = self.branch_pool.forward(self.pool.forward(x));
        Tensor::cat(vec![b1, b7, bd, bp], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionD<B: Backend> {
    pub branch3x3_1: BasicConv<B>,
    pub branch3x3_2: BasicConv<B>,
    pub branch7x7x3_1: BasicConv<B>,
    pub branch7x7x3_2: BasicConv<B>,
    pub branch7x7x3_3: BasicConv<B>,
    pub branch7x7x3_4: BasicConv<B>,
    pool: MaxPool2d,
}

impl<B: Backend> InceptionD<B> {
    fn new(c: usize, d: &B::Device) -> Self {
        Self {
            branch3x3_1: BasicConv::square(c, 192, 1, 1, 0, d),
            branch3x3_2: BasicConv::square(192, 320, 3, 2, 0, d),
            branch7x7x3_1: BasicConv::square(c, 192, 1, 1, 0, d),
            branch7x7x3_2: BasicConv::new([192, 192], [1, 7], 1, [0, 3], d),
            branch7x7x3_3: BasicConv::new([192, 192], [7, 1], 1, [3, 0], d),
            branch7x7x3_4: BasicConv::square(192, 192, 3, 2, 0, d),
            pool: max_pool(2, 0),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b3 = self.branch3x3_2.forward(self.branch3x3_1.forward(x.clone()));
        let b7 = self.branch7x7x3_2.forward(self.branch7x7x3_1.forward(x.clone()));
        let b7 = self.branch7x7x3_4.forward(self.branch7x7x3_3.forward(b7));
        Tensor::cat(vec![b3, b7, self.pool.forward(x)], 1)
    }
}

#[derive(Module, Debug)]
pub struct InceptionE<B: Backend> {
    pub branch1x1: BasicConv<B>,
    pub branch3x3_1: BasicConv<B>,
    pub branch3x3_2a: BasicConv<B>,
    pub branch3x3_2b: BasicConv<B>,
    pub branch3x3dbl_1: BasicConv<B>,
    pub branch3x3dbl_2: BasicConv<B>,
    pub branch3x3dbl_3a: BasicConv<B>,
    pub branch3x3dbl_3b: BasicConv<B>,
    pub branch_pool: BasicConv<B>,
    /// Mixed_7b pools by average (without the padding), Mixed_7c by maximum: the FID graph's quirk.
    average: Option<AvgPool2d>,
    maximum: MaxPool2d,
}

impl<B: Backend> InceptionE<B> {
    fn new(c: usize, average: bool, d: &B::Device) -> Self {
        Self {
            branch1x1: BasicConv::square(c, 320, 1, 1, 0, d),
            branch3x3_1: BasicConv::square(c, 384, 1, 1, 0, d),
            branch3x3_2a: BasicConv::new([384, 384], [1, 3], 1, [0, 1], d),
            branch3x3_2b: BasicConv::new([384, 384], [3, 1], 1, [1, 0], d),
            branch3x3dbl_1: BasicConv::square(c, 448, 1, 1, 0, d),
            branch3x3dbl_2: BasicConv::square(448, 384, 3, 1, 1, d),
            branch3x3dbl_3a: BasicConv::new([384, 384], [1, 3], 1, [0, 1], d),
            branch3x3dbl_3b: BasicConv::new([384, 384], [3, 1], 1, [1, 0], d),
            branch_pool: BasicConv::square(c, 192, 1, 1, 0, d),
            average: average.then(average_pool),
            maximum: max_pool(1, 1),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b1 = self.branch1x1.forward(x.clone());
        let b3 = self.branch3x3_1.forward(x.clone());
        let b3 = Tensor::cat(vec![self.branch3x3_2a.forward(b3.clone()), self.branch3x3_2b.forward(b3)], 1);
        let bd = self.branch3x3dbl_2.forward(self.branch3x3dbl_1.forward(x.clone()));
        let bd =
            Tensor::cat(vec![self.branch3x3dbl_3a.forward(bd.clone()), self.branch3x3dbl_3b.forward(bd)], 1);
        let pooled = match &self.average {
            Some(pool) => pool.forward(x),
            None => self.maximum.forward(x),
        };
        Tensor::cat(vec![b1, b3, bd, self.branch_pool.forward(pooled)], 1)
    }
}

#[derive(Module, Debug)]
pub struct FidInception<B: Backend> {
    pub conv2d_1a_3x3: BasicConv<B>,
    pub conv2d_2a_3x3: BasicConv<B>,
    pub conv2d_2b_3x3: BasicConv<B>,
    pub conv2d_3b_1x1: BasicConv<B>,
    pub conv2d_4a_3x3: BasicConv<B>,
    pub mixed_5b: InceptionA<B>,
    pub mixed_5c: InceptionA<B>,
    pub mixed_5d: InceptionA<B>,
    pub mixed_6a: InceptionB<B>,
    pub mixed_6b: InceptionC<B>,
    pub mixed_6c: InceptionC<B>,
    pub mixed_6d: InceptionC<B>,
    pub mixed_6e: InceptionC<B>,
    pub mixed_7a: InceptionD<B>,
    pub mixed_7b: InceptionE<B>,
    pub mixed_7c: InceptionE<B>,
    stem_pool: MaxPool2d,
}

/// The side the network reads; every image is resized to it.
pub const SIDE: usize = 299;

/// The file's top-level names (torchvision's), as the struct spells them.
pub const BLOCKS: [&str; 16] = [
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
];

impl<B: Backend> FidInception<B> {
    pub fn init(d: &B::Device) -> Self {
        Self {
            conv2d_1a_3x3: BasicConv::square(3, 32, 3, 2, 0, d),
            conv2d_2a_3x3: BasicConv::square(32, 32, 3, 1, 0, d),
            conv2d_2b_3x3: BasicConv::square(32, 64, 3, 1, 1, d),
            conv2d_3b_1x1: BasicConv::square(64, 80, 1, 1, 0, d),
            conv2d_4a_3x3: BasicConv::square(80, 192, 3, 1, 0, d),
            mixed_5b: InceptionA::new(192, 32, d),
            mixed_5c: InceptionA::new(256, 64, d),
            mixed_5d: InceptionA::new(288, 64, d),
            mixed_6a: InceptionB::new(288, d),
            mixed_6b: InceptionC::new(768, 128, d),
            mixed_6c: InceptionC::new(768, 160, d),
            mixed_6d: InceptionC::new(768, 160, d),
            mixed_6e: InceptionC::new(768, 192, d),
            mixed_7a: InceptionD::new(768, d),
            mixed_7b: InceptionE::new(1280, true, d),
            mixed_7c: InceptionE::new(2048, false, d),
            stem_pool: max_pool(2, 0),
        }
    }

    /// The 2,048 pool features of `images` [n, 3, 299, 299], already in [−1, 1].
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.conv2d_2b_3x3.forward(self.conv2d_2a_3x3.forward(self.conv2d_1a_3x3.forward(x)));
        let x = self.stem_pool.forward(x);
        let x = self.stem_pool.forward(self.conv2d_4a_3x3.forward(self.conv2d_3b_1x1.forward(x)));
        let x = self.mixed_5d.forward(self.mixed_5c.forward(self.mixed_5b.forward(x)));
        let x = self.mixed_6a.forward(x);
        let x = self.mixed_6e.forward(self.mixed_6d.forward(self.mixed_6c.forward(self.mixed_6b.forward(x))));
        let x = self.mixed_7c.forward(self.mixed_7b.forward(self.mixed_7a.forward(x)));
        let [n, c, _, _] = x.dims();
        x.mean_dim(3).mean_dim(2).reshape([n, c])
    }
}
