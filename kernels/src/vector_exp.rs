//! `exp` over a slice of f32, vectorised: the softmaxes of the CPU paths (LM head, attention) and
//! SwiGLU's sigmoid spend about 7 % of a training step in the C library's scalar `expf`.
//!
//! One polynomial (Cody–Waite range reduction, then Cephes' degree-6 polynomial for `e^r` on
//! `[−ln 2 / 2, ln 2 / 2]`), within 1 ulp of the exact value, compiled three times: for AVX-512,
//! for AVX2 and for the baseline target, picked at run time. Rust never fuses a multiply and an add
//! on its own, so the three give the same bits on every x86-64 machine.

/// `e^x` for one value: within 1 ulp for `x` in `[−87.3, 88.7]`, `0` below (where `e^x` is
/// subnormal), `+∞` above; NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n · LN2_HI` is exact for |n| ≤ 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_55;
    const HIGH: f32 = 88.722_84;
    // Comparisons, not `max`/`min`, so that a NaN goes through.
    let xc = if x < LOW { LOW } else { x };
    let xc = if xc > HIGH { HIGH } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the integer in `t`'s low bits, as 2^(n − 1) · 2 for n > 0 so that n = 128 does
    // not overflow the exponent field.
    let k: u32 = if n > 0.0 { 1 } else { 0 };
    let n_bits = t.to_bits().wrapping_sub(0x4B40_0000);
    let two_n = f32::from_bits(n_bits.wrapping_sub(k).wrapping_add(127) << 23);
    let e = y * two_n * (1 + k) as f32;
    if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else {
        e
    }
}

fn exp_baseline(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_avx2(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_avx512(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = exp(*x));
}

/// `xs[i] = e^xs[i]`, with the widest vectors this CPU has.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { exp_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { exp_avx2(xs) };
        }
    }
    exp_baseline(xs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance from the exact value in units of the last place of the exact value rounded to f32.
    fn ulps(got: f32, x: f32) -> f64 {
        let want = (x as f64).exp();
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn within_one_ulp_over_the_normal_range() {
        let mut xs: Vec<f32> = (0..1_000_000)
            .map(|i| -87.3 + 175.9 * i as f32 / 1_000_000.0)
            .collect();
        let args = xs.clone();
        exp_in_place(&mut xs);
        let worst = xs
            .iter()
            .zip(&args)
            .map(|(&e, &x)| ulps(e, x))
            .fold(0.0, f64::max);
        assert!(worst <= 1.0, "{worst} ulp");
    }

    #[test]
    fn edges_and_special_values() {
        let mut xs = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            -100.0,
            f32::NEG_INFINITY,
            88.5,
            89.0,
            f32::INFINITY,
            f32::NAN,
        ];
        exp_in_place(&mut xs);
        let e = std::f64::consts::E;
        assert_eq!(&xs[..6], &[1.0, 1.0, e as f32, (1.0 / e) as f32, 0.0, 0.0]);
        assert!(ulps(xs[6], 88.5) <= 2.0, "e^88.5: {}", xs[6]);
        assert_eq!(&xs[7..9], &[f32::INFINITY, f32::INFINITY]);
        assert!(xs[9].is_nan());
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let args: Vec<f32> = (0..100_003)
            .map(|i| -90.0 + 180.0 * i as f32 / 100_003.0)
            .collect();
        let mut base = args.clone();
        exp_baseline(&mut base);
        let mut picked = args.clone();
        exp_in_place(&mut picked);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&base), bits(&picked));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut avx2 = args.clone();
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { exp_avx2(&mut avx2) };
            assert_eq!(bits(&base), bits(&avx2));
        }
    }
}
