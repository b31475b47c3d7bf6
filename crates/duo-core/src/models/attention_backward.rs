//! Attention whose backward pass recomputes the attention map instead of storing it.
//!
//! On an autodiff backend Burn 0.21 runs `module::attention` in its decomposed form, and the graph
//! keeps two `[batch, heads, queries, keys]` maps per layer (the exponentials and the softmax) until
//! the backward pass: 16 GB for SD 1.4's five 64×64 self-attention layers on one DUO pair at 512².
//! Here the forward pass is the inner backend's fused kernel and the graph keeps q, k, v and the
//! output; the backward pass rebuilds the softmax a block of query rows at a time (as
//! FlashAttention's does), so at most one block's maps exist at once.
//!
//! Burn has no hook for a custom backward in code generic over `B: Backend`, so
//! [`try_memory_efficient`] recognises the autodiff backends this crate is built with by type and
//! hands every other backend (the inference ones, which need no graph) back to the caller.

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{
    BalancedCheckpointing, CheckpointStrategy, NoCheckpointing,
};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{FloatDType, TensorPrimitive};

/// Query, key and value, `[batch, heads, len, head_dim]` each.
pub type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Elements of one block's `[batch, heads, rows, keys]` map in the backward pass (256 MiB in f32).
const BLOCK_ELEMENTS: usize = 1 << 26;

/// Non-causal, unmasked attention with the default 1/√head_dim scale, through the recomputing
/// backward when `B` is one of this build's autodiff backends; `Err` gives q, k, v back otherwise.
pub fn try_memory_efficient<B: Backend>(qkv: Qkv<B>) -> Result<Tensor<B, 4>, Qkv<B>> {
    macro_rules! each_autodiff_backend {
        ($qkv:ident; $($(#[$cfg:meta])* $inner:ty),* $(,)?) => {$(
            $(#[$cfg])*
            let $qkv = match on::<B, $inner, NoCheckpointing>($qkv)
                .or_else(on::<B, $inner, BalancedCheckpointing>)
            {
                Ok(out) => return Ok(out),
                Err(qkv) => qkv,
            };
        )*};
    }
    each_autodiff_backend!(qkv;
        #[cfg(feature = "flex")] burn::backend::Flex,
        #[cfg(feature = "ndarray")] burn::backend::NdArray,
        #[cfg(feature = "wgpu")] burn::backend::Wgpu,
        #[cfg(feature = "vulkan")] burn::backend::Vulkan,
        #[cfg(feature = "cuda")] burn::backend::Cuda,
    );
    Err(qkv)
}

/// The recomputing attention if `B` is `Autodiff<X, C>`.
fn on<B: Backend, X: Backend, C: CheckpointStrategy>(qkv: Qkv<B>) -> Result<Tensor<B, 4>, Qkv<B>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<X, C>>() {
        return Err(qkv);
    }
    let (q, k, v) = qkv;
    let out = forward::<X, C>(same_type(q), same_type(k), same_type(v));
    Ok(same_type(out))
}

/// `x` as the type it is (checked by the caller's `TypeId` comparison).
fn same_type<T: Any, U: Any>(x: T) -> U {
    *(Box::new(x) as Box<dyn Any>).downcast::<U>().expect("the backend types were compared")
}

fn primitive<B: Backend>(x: Tensor<B, 4>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}

fn tensor<B: Backend>(x: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

#[derive(Debug)]
struct RecomputingAttention;

/// q, k, v and the output, on the inner backend.
type Saved<B> = [FloatTensor<B>; 4];

impl<B: Backend> Backward<B, 3> for RecomputingAttention {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_out = grads.consume::<B>(&ops.node);
        let [q, k, v, out] = ops.state.map(tensor::<B>);
        let [grad_q, grad_k, grad_v] = attention_grads(q, k, v, out, tensor(grad_out), BLOCK_ELEMENTS);
        for (parent, grad) in ops.parents.into_iter().zip([grad_q, grad_k, grad_v]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, primitive(grad));
            }
        }
    }
}

fn forward<X: Backend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<X, C>, 4>,
    k: Tensor<Autodiff<X, C>, 4>,
    v: Tensor<Autodiff<X, C>, 4>,
) -> Tensor<Autodiff<X, C>, 4> {
    let (q, k, v) = (primitive(q), primitive(k), primitive(v));
    let fused = |q: FloatTensor<X>, k: FloatTensor<X>, v: FloatTensor<X>| {
        let options = AttentionModuleOptions::default();
        primitive(attention(tensor::<X>(q), tensor(k), tensor(v), None, None, options))
    };
    let prepared = RecomputingAttention
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful();
    let out = match prepared {
        OpsKind::Tracked(prep) => {
            let out = fused(q.primitive.clone(), k.primitive.clone(), v.primitive.clone());
            prep.finish([q.primitive, k.primitive, v.primitive, out.clone()], out)
        }
        OpsKind::UnTracked(prep) => prep.finish(fused(q.primitive, k.primitive, v.primitive)),
    };
    tensor(out)
}

/// The gradients of softmax(q·kᵀ/√d)·v with respect to q, k and v, given the output and its
/// gradient; computed in f32, for blocks of query rows whose maps hold about `block_elements` values.
fn attention_grads<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    grad_out: Tensor<B, 4>,
    block_elements: usize,
) -> [Tensor<B, 4>; 3] {
    let dtype = q.dtype();
    let f32 = |x: Tensor<B, 4>| x.cast(FloatDType::F32);
    let (q, k, v, out, grad_out) = (f32(q), f32(k), f32(v), f32(out), f32(grad_out));
    let [batch, heads, queries, head_dim] = q.dims();
    let keys = k.dims()[2];
    let scale = (head_dim as f64).sqrt().recip();
    // Δ = rowsum(dO ⊙ O), the softmax backward's correction term.
    let delta = (grad_out.clone() * out).sum_dim(3);
    let rows = (block_elements / (batch * heads * keys)).clamp(1, queries);
    let device = q.device();
    let value_dim = v.dims()[3];
    let (k_t, v_t) = (k.clone().swap_dims(2, 3), v.swap_dims(2, 3));
    let mut grad_q = Vec::new();
    let mut grad_k = Tensor::<B, 4>::zeros([batch, heads, keys, head_dim], &device);
    let mut grad_v = Tensor::<B, 4>::zeros([batch, heads, keys, value_dim], &device);
    for start in (0..queries).step_by(rows) {
        let len = rows.min(queries - start);
        let q_block = q.clone().narrow(2, start, len);
        let grad_out_block = grad_out.clone().narrow(2, start, len);
        let p = softmax(q_block.clone().matmul(k_t.clone()) * scale, 3);
        grad_v = grad_v + p.clone().swap_dims(2, 3).matmul(grad_out_block.clone());
        let grad_p = grad_out_block.matmul(v_t.clone());
        let grad_s = p * (grad_p - delta.clone().narrow(2, start, len)) * scale;
        grad_q.push(grad_s.clone().matmul(k.clone()));
        grad_k = grad_k + grad_s.swap_dims(2, 3).matmul(q_block);
    }
    let back = |x: Tensor<B, 4>| x.cast(crate::device::float_dtype(dtype));
    [back(Tensor::cat(grad_q, 2)), back(grad_k), back(grad_v)]
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    use super::*;

    fn max_error<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        (a - b).abs().max().into_scalar().elem()
    }

    /// Cross-attention shapes (37 queries, 29 keys) on autodiff Flex: our op against Burn's own
    /// decomposed attention, forward and the three gradients.
    fn check_against_burn<C: CheckpointStrategy>() {
        type A<C> = Autodiff<Flex, C>;
        let device = Default::default();
        A::<C>::seed(&device, 7);
        let normal =
            |shape: [usize; 4]| Tensor::<A<C>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (normal([2, 3, 37, 8]), normal([2, 3, 29, 8]), normal([2, 3, 29, 8]));
        let weights = normal([2, 3, 37, 8]);
        let leaves = || (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());

        let (q1, k1, v1) = leaves();
        let ours = try_memory_efficient((q1.clone(), k1.clone(), v1.clone())).expect("an autodiff backend");
        let grads = (ours.clone() * weights.clone()).sum().backward();
        let (q2, k2, v2) = leaves();
        let burns = attention(q2.clone(), k2.clone(), v2.clone(), None, None, Default::default());
        let reference = (burns.clone() * weights).sum().backward();

        assert!(max_error(ours, burns) < 1e-5);
        for (name, a, b) in [("q", q1, q2), ("k", k1, k2), ("v", v1, v2)] {
            let (a, b) = (a.grad(&grads).unwrap(), b.grad(&reference).unwrap());
            let error = max_error(a.clone(), b);
            assert!(error < 1e-5, "grad {name}: max error {error}");
            assert!(max_error(a.clone(), a.zeros_like()) > 1e-2, "grad {name} is not trivial");
        }
    }

    #[test]
    fn gradients_match_burns_decomposed_attention() {
        check_against_burn::<NoCheckpointing>();
        check_against_burn::<BalancedCheckpointing>();
    }

    #[test]
    fn inference_backends_keep_the_fused_kernel() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::zeros([1, 1, 2, 4], &device);
        assert!(try_memory_efficient((x.clone(), x.clone(), x)).is_err());
    }

    #[test]
    fn blocks_of_query_rows_give_the_same_gradients() {
        let device = Default::default();
        Flex::seed(&device, 3);
        let normal =
            |shape: [usize; 4]| Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, grad_out) =
            (normal([1, 2, 23, 4]), normal([1, 2, 11, 4]), normal([1, 2, 11, 4]), normal([1, 2, 23, 4]));
        let out = attention(q.clone(), k.clone(), v.clone(), None, None, Default::default());
        let args = || (q.clone(), k.clone(), v.clone(), out.clone(), grad_out.clone());
        let whole = {
            let (q, k, v, out, grad_out) = args();
            attention_grads(q, k, v, out, grad_out, usize::MAX)
        };
        // 5 rows per block: 23 = 4 × 5 + 3
        let blocks = {
            let (q, k, v, out, grad_out) = args();
            attention_grads(q, k, v, out, grad_out, 2 * 11 * 5)
        };
        for (a, b) in whole.into_iter().zip(blocks) {
            assert!(max_error(a, b) < 1e-6);
        }
    }
}
