//! [`backward`]: candle's backward pass, with the gradients that this crate's ops compute for
//! *variables* stored straight into the gradient store.
//!
//! candle 0.11 adds every gradient into its store as `zeros_like(t) + g`: for the 3072×3072
//! weight of a linear layer that is a fresh 37.7 MB of zeros (page faults, then a fill) and an
//! addition into another fresh 37.7 MB, every step — 15–20% of a dense training step of the wide
//! MLP under `perf` (docs/benchmarks.md). A variable is a leaf: its gradient goes nowhere else,
//! so inside [`backward`] the ops of this crate (dense and sparse linear, conv) hand
//! the gradient of a variable argument to a per-thread list instead of returning it, and
//! [`backward`] inserts each into the store after candle's pass (adding it to what candle
//! stored for that variable, if anything — a variable used by other ops too).
//!
//! The values are those of `loss.backward()` except that a gradient of `-0.0` stays `-0.0`
//! (candle's `0 + g` turns it into `+0.0`); an optimizer step gives the same weights either way.
//! Outside [`backward`] (a plain `loss.backward()`) the ops return every gradient as candle
//! expects.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

thread_local! {
    /// `Some` while [`backward`] runs on this thread: (variable, gradient) in the order the ops
    /// produced them.
    static DEFERRED: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the gradients of variables that this crate's ops produce stored
/// without candle's `zeros + g` (see the module documentation). Same store, same keys.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let outer = DEFERRED.with(|d| d.replace(Some(Vec::new())));
    let result = loss.backward();
    let deferred = DEFERRED.with(|d| d.replace(outer)).unwrap_or_default();
    let mut grads = result?;
    for (var, g) in deferred {
        let g = match grads.remove(&var) {
            Some(prev) => prev.add(&g)?,
            None => g,
        };
        grads.insert(&var, g);
    }
    Ok(grads)
}

/// The gradient `g` of an op's argument `t` as the op's `bwd` should return it: `None` (kept
/// for [`backward`] to store) when `t` is a variable and [`backward`] is running on this
/// thread, else `Some(g)`.
pub(crate) fn pass(t: &Tensor, g: Tensor) -> Option<Tensor> {
    if !t.is_variable() {
        return Some(g);
    }
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(list) => {
            list.push((t.clone(), g));
            None
        }
        None => Some(g),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn gradients_equal_candles_including_a_variable_used_twice() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (5, 7), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 7), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 3, &dev)?)?;
        // `w` feeds the op twice and a candle op once (an L2 term): three contributions.
        let loss = |x: &Tensor| -> Result<Tensor> {
            let h = crate::dense::linear(x, w.as_tensor(), Some(b.as_tensor()))?;
            let h2 = crate::dense::linear(x, w.as_tensor(), None)?;
            h.sqr()?.sum_all()? + h2.sum_all()? + w.as_tensor().sqr()?.sum_all()?
        };
        let plain = loss(&x)?.backward()?;
        let ours = backward(&loss(&x)?)?;
        for v in [w.as_tensor(), b.as_tensor()] {
            let (a, o) = (plain.get(v).unwrap(), ours.get(v).unwrap());
            let diff = (a - o)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "gradients differ by {diff}");
        }
        // Outside `backward` nothing is deferred, and nothing is left over inside it.
        assert!(DEFERRED.with(|d| d.borrow().is_none()));
        Ok(())
    }
}
