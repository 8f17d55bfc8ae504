//! Constant tensors of the composed ops, built once per shape and kept on the device.
//!
//! The composed reference ops (the path `Cuda` takes) need small constant tensors: RoPE's cos/sin
//! tables, the causal mask of block attention, CEMA's exponent tables and Toeplitz selectors,
//! index tensors for `select`/`gather`. Building them on the host and copying them to the device
//! at every call is a host-to-device transfer inside the forward pass; this cache builds each one
//! the first time a (kind, shape, parameters) key is seen and hands out cheap clones afterwards
//! (`docs/cuda.md`, "Host-device traffic of the composed path").
//!
//! The cache is per thread (a training loop drives the ops from one thread) and bounded: past
//! [`MAX_BYTES`] of constants it starts over. [`clear`] empties it (the training loop does when
//! it ends, with [`super::release_pool`]). Data-dependent masks (padding) are not constants and
//! are still copied per call.
//!
//! A constant is built by a synchronous copy, so a tensor first built on one CUDA stream is
//! complete before any other device instance of the same thread reads it.

use dfdx::prelude::*;
use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::HashMap;

/// Bytes of constants a thread keeps before the cache starts over.
pub const MAX_BYTES: usize = 256 << 20;

/// What identifies a constant: the tensor's type (shape type, dtype, device), a kind name and the
/// integers that fix its values (sizes, offsets, `f64::to_bits` of real parameters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    ty: TypeId,
    kind: &'static str,
    params: Vec<u64>,
}

#[derive(Default)]
struct Store {
    map: HashMap<Key, Box<dyn Any>>,
    bytes: usize,
}

thread_local! {
    static STORE: RefCell<Store> = RefCell::new(Store::default());
}

/// The value stored under `key`, or the one `build` gives (with its size in bytes), stored.
fn cached<V: Clone + 'static>(key: Key, build: impl FnOnce() -> (V, usize)) -> V {
    let hit = STORE.with(|s| {
        s.borrow()
            .map
            .get(&key)
            .and_then(|b| b.downcast_ref::<V>())
            .cloned()
    });
    if let Some(v) = hit {
        return v;
    }
    let (v, bytes) = build();
    STORE.with(|s| {
        let mut s = s.borrow_mut();
        if s.bytes.saturating_add(bytes) > MAX_BYTES {
            s.map.clear();
            s.bytes = 0;
        }
        if bytes <= MAX_BYTES {
            s.map.insert(key, Box::new(v.clone()));
            s.bytes += bytes;
        }
    });
    v
}

/// The constant `kind` with parameters `params` and shape `shape`; `build` gives its values
/// (row-major, `shape.num_elements()` of them) the first time.
///
/// `params` must fix the values completely together with `shape` and the dtype: two calls with
/// the same key get the same tensor.
pub fn tensor<S: Shape, E: Dtype, D: Device<E>>(
    dev: &D,
    kind: &'static str,
    params: &[u64],
    shape: S,
    build: impl FnOnce() -> Vec<E>,
) -> Tensor<S, E, D> {
    let key = Key {
        ty: TypeId::of::<Tensor<S, E, D>>(),
        kind,
        params: shape_params(&shape, params),
    };
    cached(key, || {
        let v = build();
        debug_assert_eq!(v.len(), shape.num_elements(), "constant `{kind}`");
        let mut t = dev.zeros_like(&shape);
        t.copy_from(&v); // a synchronous copy (see the module docs)
        (t, v.len() * std::mem::size_of::<E>())
    })
}

/// An index tensor (for `select`/`gather`), cached like [`tensor`]. `E` is the float type of the
/// op it serves: a one-element synchronous copy of that type waits for the index upload.
pub fn indices<S: Shape, E: Dtype, D: Device<E>>(
    dev: &D,
    kind: &'static str,
    params: &[u64],
    shape: S,
    build: impl FnOnce() -> Vec<usize>,
) -> Tensor<S, usize, D> {
    let key = Key {
        ty: TypeId::of::<(Tensor<S, usize, D>, E)>(),
        kind,
        params: shape_params(&shape, params),
    };
    cached(key, || {
        let v = build();
        let n = v.len();
        let t: Tensor<S, usize, D> = dev.tensor_from_vec(v, shape);
        let mut fence: Tensor<Rank1<1>, E, D> = dev.zeros();
        fence.copy_from(&[E::default()]);
        (t, n * std::mem::size_of::<usize>())
    })
}

/// The key's parameters: the run-time dimensions of `shape`, then `params`.
fn shape_params<S: Shape>(shape: &S, params: &[u64]) -> Vec<u64> {
    let dims = shape.concrete();
    let mut v = Vec::with_capacity(S::NUM_DIMS + params.len());
    v.extend(dims.into_iter().take(S::NUM_DIMS).map(|d| d as u64));
    v.extend_from_slice(params);
    v
}

/// The bits of real parameters, for a key.
pub fn bits(xs: &[f64]) -> Vec<u64> {
    xs.iter().map(|x| x.to_bits()).collect()
}

/// Drops every constant this thread holds.
pub fn clear() {
    STORE.with(|s| {
        let mut s = s.borrow_mut();
        s.map.clear();
        s.bytes = 0;
    })
}

/// Number of constants this thread holds and their bytes (for tests and diagnostics).
pub fn stats() -> (usize, usize) {
    STORE.with(|s| {
        let s = s.borrow();
        (s.map.len(), s.bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_once_per_key_and_shape() {
        clear();
        let dev = Cpu::default();
        let mut builds = 0;
        let mut get = |n: usize, p: u64| {
            tensor(&dev, "test", &[p], (n,), || {
                builds += 1;
                vec![p as f32; n]
            })
        };
        let a = get(3, 1);
        let b = get(3, 1);
        let c = get(4, 1);
        let d = get(3, 2);
        assert_eq!(a.as_vec(), vec![1.0; 3]);
        assert_eq!(b.as_vec(), vec![1.0; 3]);
        assert_eq!(c.as_vec(), vec![1.0; 4]);
        assert_eq!(d.as_vec(), vec![2.0; 3]);
        assert_eq!(builds, 3);
        assert_eq!(stats(), (3, 40));
        // another dtype is another constant
        let e: Tensor<(usize,), f64, Cpu> = tensor(&dev, "test", &[1], (3,), || vec![1.0; 3]);
        assert_eq!(e.as_vec(), vec![1.0; 3]);
        assert_eq!(stats().0, 4);
        let i = indices::<_, f32, _>(&dev, "idx", &[], (2,), || vec![1, 0]);
        assert_eq!(i.as_vec(), vec![1, 0]);
        clear();
        assert_eq!(stats(), (0, 0));
    }

    /// The composed ops build their constants on the first call of a shape only: a second
    /// forward of the same shapes adds nothing, a new length adds its own.
    #[test]
    fn composed_ops_reuse_their_constants() {
        use crate::ops::block_attention::{composed_block_attention, BlockMask};
        use crate::ops::rope::Rope;
        use crate::ops::timestep_norm::composed_timestep_norm;
        clear();
        let dev = Cpu::default();
        let rope = Rope::new(4, 10000.0);
        let w: Tensor<Rank1<8>, f64, Cpu> = dev.zeros();
        let run = |t: usize| {
            let x: Tensor<(usize, usize, Const<2>, usize), f64, Cpu> =
                dev.sample_normal_like(&(1, t, Const, 4));
            let positions: Vec<usize> = (0..t).collect();
            let r = rope.apply(x.clone(), &positions);
            let b = x.reshape_like(&(1, Const::<2>, t, 4));
            let mask = BlockMask {
                causal_offset: Some(0),
                valid_keys: None,
            };
            let a = composed_block_attention(b.clone(), b.clone(), b, &mask).unwrap();
            let s: Tensor<(usize, usize, Const<8>), f64, Cpu> =
                dev.sample_normal_like(&(2, t, Const));
            let (y, st) =
                composed_timestep_norm::<8, 2, _, _, _>(s, &w, &w, 1e-5, None, None).unwrap();
            // a carried state with one count for both rows: the scalar path, no new constant
            let (y2, _) =
                composed_timestep_norm::<8, 2, _, _, _>(y.clone(), &w, &w, 1e-5, Some(st), None)
                    .unwrap();
            assert!(r
                .as_vec()
                .iter()
                .chain(&a.as_vec())
                .chain(&y2.as_vec())
                .all(|v| v.is_finite()));
        };
        run(5);
        let first = stats();
        assert!(first.0 >= 5, "{first:?}");
        run(5);
        assert_eq!(
            stats(),
            first,
            "a second forward of the same shapes built constants"
        );
        run(7);
        assert!(stats().0 > first.0);
        clear();
    }
}
