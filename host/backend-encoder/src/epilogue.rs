//! The work after a reduced-precision product's dot products (INT8 after dequantization,
//! BF16 straight from its f32 sums), done while the outputs are in registers:
//! `y (+)= act(v + bias)`, with attention's scale on Q. One scalar definition, inlined
//! into every kernel, and its AVX-512 twin: the same IEEE operations in the same order,
//! so no kernel rounds differently.

use crate::ops::Activation;

#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub activation: Option<Activation>,
    /// Multiplies the first columns (a multiple of 16) by a factor after the bias:
    /// attention's 1/√d on Q, in the product that computes Q, K and V.
    pub scale_first: Option<(usize, f32)>,
    /// Adds to y (the residual) instead of overwriting it.
    pub accumulate: bool,
}

impl Epilogue<'_> {
    /// Finishes `v`, output columns `column..column+L` of one row, into `out` (those L
    /// values of y).
    #[inline(always)]
    pub fn finish<const L: usize>(&self, mut v: [f32; L], column: usize, out: &mut [f32]) {
        if let Some(bias) = self.bias {
            let bias = &bias[column..column + L];
            for c in 0..L {
                v[c] += bias[c];
            }
        }
        if let Some((columns, factor)) = self.scale_first {
            if column < columns {
                for value in v.iter_mut() {
                    *value *= factor;
                }
            }
        }
        if let Some(act) = self.activation {
            activate(act, &mut v);
        }
        if self.accumulate {
            for c in 0..L {
                out[c] += v[c];
            }
        } else {
            out.copy_from_slice(&v);
        }
    }
}

/// `v = act(v)`, the match outside the loop so that it vectorises.
#[inline(always)]
pub fn activate<const L: usize>(act: Activation, v: &mut [f32; L]) {
    match act {
        Activation::Gelu => v.iter_mut().for_each(|v| *v = Activation::Gelu.apply(*v)),
        Activation::GeluTanh => v
            .iter_mut()
            .for_each(|v| *v = Activation::GeluTanh.apply(*v)),
        other => v.iter_mut().for_each(|v| *v = other.apply(*v)),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::Epilogue;
    use std::arch::x86_64::*;

    /// [`Epilogue::finish`] of 16 values in a register, written to `out`.
    ///
    /// # Safety
    /// The CPU runs AVX-512F; `out` points at 16 writable f32; the epilogue's bias has
    /// `column + 16` values.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn finish(e: &Epilogue, mut v: __m512, column: usize, out: *mut f32) {
        if let Some(bias) = e.bias {
            v = _mm512_add_ps(v, _mm512_loadu_ps(bias.as_ptr().add(column)));
        }
        if let Some((columns, factor)) = e.scale_first {
            if column < columns {
                v = _mm512_mul_ps(v, _mm512_set1_ps(factor));
            }
        }
        if let Some(act) = e.activation {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), v);
            super::activate(act, &mut lanes);
            v = _mm512_loadu_ps(lanes.as_ptr());
        }
        if e.accumulate {
            v = _mm512_add_ps(v, _mm512_loadu_ps(out));
        }
        _mm512_storeu_ps(out, v);
    }
}
