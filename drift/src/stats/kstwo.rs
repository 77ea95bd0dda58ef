//! One-sample Kolmogorov distribution: `scipy.stats.kstwo.sf` (Simard &
//! L'Ecuyer), with scipy's algorithms and switch-over points (Ruben–Gambino,
//! Durbin matrix, Pomeranz, Pelz–Good, Smirnov).

const SQRT_2PI: f64 = 2.506_628_274_631_000_7;
const TWO_128: f64 = 340_282_366_920_938_463_463_374_607_431_768_211_456.0;
const TWO_M128: f64 = 1.0 / TWO_128;
/// Below this log, exp underflows (cephes MINLOG).
const MIN_LOG: f64 = -708.396_418_532_264_1;

/// x · 2^e without intermediate overflow/underflow.
fn ldexp(mut x: f64, mut e: i64) -> f64 {
    while e > 1000 {
        x *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
    }
    x * 2f64.powi(e as i32)
}

/// P(D_n >= x) for the two-sided one-sample KS statistic D_n
/// (`scipy.stats.kstwo.sf(x, n)`, same algorithm choices as scipy).
pub(super) fn kolmogorov_n_sf(n: u64, x: f64) -> f64 {
    let nf = n as f64;
    if x >= 1.0 {
        return 0.0;
    }
    if x <= 0.0 {
        return 1.0;
    }
    let t = nf * x;
    if t <= 1.0 {
        // Ruben–Gambino: 1/(2n) <= x <= 1/n.
        if t <= 0.5 {
            return 1.0;
        }
        let cdf = if n <= 140 {
            (1..=n)
                .map(|i| i as f64 * (1.0 / nf) * (2.0 * t - 1.0))
                .product::<f64>()
        } else {
            (log_nfactorial_div_n_pow_n(nf) + nf * (2.0 * t - 1.0).ln()).exp()
        };
        return (1.0 - cdf).clamp(0.0, 1.0);
    }
    if t >= nf - 1.0 {
        return (2.0 * (1.0 - x).powf(nf)).clamp(0.0, 1.0);
    }
    if x >= 0.5 {
        return (2.0 * smirnov_sf(n, x)).clamp(0.0, 1.0);
    }
    let nxx = t * x;
    let cdf = if n <= 140 {
        if nxx <= 0.754693 {
            durbin_cdf(n, x)
        } else if nxx <= 4.0 {
            pomeranz_cdf(n, x)
        } else {
            return (2.0 * smirnov_sf(n, x)).clamp(0.0, 1.0);
        }
    } else {
        if nxx >= 370.0 {
            return 0.0;
        }
        if nxx >= 2.2 {
            return (2.0 * smirnov_sf(n, x)).clamp(0.0, 1.0);
        }
        if n <= 100_000 && nf * x.powf(1.5) <= 1.4 {
            durbin_cdf(n, x)
        } else {
            pelz_good_cdf(nf, x)
        }
    };
    (1.0 - cdf).clamp(0.0, 1.0)
}

/// ln(n! / n^n) by Stirling's series.
fn log_nfactorial_div_n_pow_n(n: f64) -> f64 {
    // B_2j / (2j (2j - 1)) for j = 8, …, 1 (Bernoulli numbers).
    const C: [f64; 8] = [
        -3617.0 / 122_400.0,
        1.0 / 156.0,
        -691.0 / 360_360.0,
        1.0 / 1188.0,
        -1.0 / 1680.0,
        1.0 / 1260.0,
        -1.0 / 360.0,
        1.0 / 12.0,
    ];
    let rn = 1.0 / n;
    let y = rn / n;
    let poly = C.iter().fold(0.0, |acc, &c| acc * y + c);
    n.ln() / 2.0 - n + (2.0 * std::f64::consts::PI).ln() / 2.0 + rn * poly
}

/// P(D_n <= d): Durbin's matrix algorithm as organised by Marsaglia, Tsang & Wang.
fn durbin_cdf(n: u64, d: f64) -> f64 {
    let nf = n as f64;
    if d >= 1.0 {
        return 1.0;
    }
    let nd = nf * d;
    if nd <= 0.5 {
        return 0.0;
    }
    let k = nd.ceil() as usize;
    let h = k as f64 - nd;
    let m = 2 * k - 1;
    let mut v = vec![0.0; m];
    let mut w = vec![0.0; m];
    let mut fac = 1.0;
    for j in 1..=m {
        w[j - 1] = fac;
        fac /= j as f64;
        v[j - 1] = (1.0 - h.powi(j as i32)) * fac;
    }
    let tt = (2.0 * h - 1.0).max(0.0).powi(m as i32) - 2.0 * h.powi(m as i32);
    v[m - 1] = (1.0 + tt) * fac;
    // H (row-major): H[r][c] = w[r - c + 1] for r >= c - 1, first column v,
    // last row v reversed.
    let mut hm = vec![0.0; m * m];
    for c in 1..m {
        for r in (c - 1)..m {
            hm[r * m + c] = w[r + 1 - c];
        }
    }
    for r in 0..m {
        hm[r * m] = v[r];
    }
    for c in 0..m {
        hm[(m - 1) * m + c] = v[m - 1 - c];
    }
    let matmul = |a: &[f64], b: &[f64]| {
        let mut out = vec![0.0; m * m];
        for r in 0..m {
            for t in 0..m {
                let art = a[r * m + t];
                if art != 0.0 {
                    for c in 0..m {
                        out[r * m + c] += art * b[t * m + c];
                    }
                }
            }
        }
        out
    };
    let mut pw = vec![0.0; m * m];
    for i in 0..m {
        pw[i * m + i] = 1.0;
    }
    let (mut nn, mut expnt, mut h_expnt) = (n, 0i64, 0i64);
    while nn > 0 {
        if nn % 2 == 1 {
            pw = matmul(&pw, &hm);
            expnt += h_expnt;
        }
        hm = matmul(&hm, &hm);
        h_expnt *= 2;
        if hm[(k - 1) * m + (k - 1)].abs() > TWO_128 {
            for x in hm.iter_mut() {
                *x /= TWO_128;
            }
            h_expnt += 128;
        }
        nn /= 2;
    }
    let mut p = pw[(k - 1) * m + (k - 1)];
    for i in 1..=n {
        p = i as f64 * p / nf;
        if p.abs() < TWO_M128 {
            p *= TWO_128;
            expnt -= 128;
        }
    }
    ldexp(p, expnt).clamp(0.0, 1.0)
}

/// P(D_n <= x): Pomeranz's recursion (n small).
fn pomeranz_cdf(n: u64, x: f64) -> f64 {
    let ni = n as i64;
    let nf = n as f64;
    let t = nf * x;
    let ll = t.floor() as i64;
    let f = t - ll as f64;
    let g = f.min(1.0 - f);
    let ceilf = i64::from(f > 0.0);
    let roundf = i64::from(f > 0.5);
    let npwrs = (2 * (ll + 1)) as usize;
    let powers = |base: f64| {
        let mut p = vec![1.0; npwrs];
        for k in 1..npwrs {
            p[k] = p[k - 1] * base / k as f64;
        }
        p
    };
    let gpower = powers(g / nf);
    let twogpower = powers(2.0 * g / nf);
    let onem2gpower = powers((1.0 - 2.0 * g) / nf);
    let bounds = |i: i64| -> (i64, i64) {
        let (j1, j2) = if i == 0 {
            (-ll - ceilf - 1, ll + ceilf - 1)
        } else {
            let (half, odd_i) = ((i + 1) / 2, (i + 1) % 2 == 0);
            if odd_i {
                if half == ni + 1 {
                    (ni - ll - ceilf - 1, ni + ll + ceilf - 1)
                } else {
                    (half - 1 - ll - roundf - 1, half + ll - 1 + ceilf - 1)
                }
            } else {
                (half - 1 - ll - 1, half + ll + roundf - 1)
            }
        };
        ((j1 + 2).max(0), j2.min(ni))
    };
    let mut v0 = vec![0.0; npwrs];
    let mut v1 = vec![0.0; npwrs];
    v1[0] = 1.0;
    let (mut v0s, mut v1s) = (0i64, 0i64);
    let mut expnt = 0i64;
    let (mut j1, _) = bounds(0);
    for i in 1..=(2 * ni + 1) {
        let k1 = j1;
        std::mem::swap(&mut v0, &mut v1);
        std::mem::swap(&mut v0s, &mut v1s);
        v1.iter_mut().for_each(|x| *x = 0.0);
        let (nj1, j2) = bounds(i);
        j1 = nj1;
        let pwrs = if i == 1 || i == 2 * ni + 1 {
            &gpower
        } else if i % 2 == 1 {
            &twogpower
        } else {
            &onem2gpower
        };
        let ln2 = j2 - k1 + 1;
        if ln2 > 0 {
            // Full convolution of V0[k1 - v0s ..][..ln2] with pwrs[..ln2], entries
            // j1 - k1 .. j2 - k1 kept.
            let off = k1 - v0s;
            let src = |idx: i64| -> f64 {
                if idx < 0 || idx >= ln2 {
                    return 0.0;
                }
                let at = off + idx;
                if at < 0 {
                    0.0
                } else {
                    v0.get(at as usize).copied().unwrap_or(0.0)
                }
            };
            let len = ln2.min(npwrs as i64);
            let conv_start = j1 - k1;
            let conv_len = j2 - j1 + 1;
            for out in 0..conv_len.max(0) {
                let kk = conv_start + out;
                let mut s = 0.0;
                for p in 0..len.min(kk + 1) {
                    let a_idx = kk - p;
                    if a_idx < len {
                        s += src(a_idx) * pwrs[p as usize];
                    }
                }
                if let Some(slot) = v1.get_mut(out as usize) {
                    *slot = s;
                }
            }
            let mx = v1.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if mx > 0.0 && mx < TWO_M128 {
                v1.iter_mut().for_each(|x| *x *= TWO_128);
                expnt -= 128;
            }
            v1s = v0s + j1 - k1;
        }
    }
    let mut ans = v1.get((ni - v1s).max(0) as usize).copied().unwrap_or(0.0);
    for mm in 1..=n {
        if ans.abs() > TWO_128 {
            ans *= TWO_M128;
            expnt += 128;
        }
        ans *= mm as f64;
    }
    ldexp(ans, expnt).clamp(0.0, 1.0)
}

/// Pelz–Good asymptotic approximation of P(D_n <= x).
fn pelz_good_cdf(n: f64, x: f64) -> f64 {
    use std::f64::consts::PI;
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let z = n.sqrt() * x;
    let (z2, z3, z4, z6) = (z * z, z.powi(3), z.powi(4), z.powi(6));
    let qlog = -PI * PI / 8.0 / z2;
    if qlog < -708.0 {
        return 0.0;
    }
    let q = qlog.exp();
    let (pi2, pi4, pi6) = (PI * PI, PI.powi(4), PI.powi(6));
    let k1a = -z2;
    let k1b = pi2 / 4.0;
    let k2a = 6.0 * z6 + 2.0 * z4;
    let k2b = (2.0 * z4 - 5.0 * z2) * pi2 / 4.0;
    let k2c = pi4 * (1.0 - 2.0 * z2) / 16.0;
    let k3d = pi6 * (5.0 - 30.0 * z2) / 64.0;
    let k3c = pi4 * (-60.0 * z2 + 212.0 * z4) / 16.0;
    let k3b = pi2 * (135.0 * z4 - 96.0 * z6) / 4.0;
    let k3a = -30.0 * z6 - 90.0 * z.powi(8);
    let mut kk = [0.0f64; 4];
    let maxk = (16.0 * z / PI).ceil() as i64;
    for k in (1..=maxk).rev() {
        let m = (2 * k - 1) as f64;
        let (m2, m4, m6) = (m * m, m.powi(4), m.powi(6));
        let qpower = q.powf((8 * k) as f64);
        let coeffs = [
            1.0,
            k1a + k1b * m2,
            k2a + k2b * m2 + k2c * m4,
            k3a + k3b * m2 + k3c * m4 + k3d * m6,
        ];
        for (s, c) in kk.iter_mut().zip(coeffs) {
            *s = *s * qpower + c;
        }
    }
    let div = [z, 6.0 * z4, 72.0 * z.powi(7), 6480.0 * z.powi(10)];
    for (s, d) in kk.iter_mut().zip(div) {
        *s = *s * q * SQRT_2PI / d;
    }
    let q2 = (-pi2 / 2.0 / z2).exp();
    let sqrt3z = 3f64.sqrt() * z;
    let (mut k2extra, mut k3extra) = (0.0, 0.0);
    for k in (1..=maxk).rev() {
        let kf = k as f64;
        let ksq = kf * kf;
        let qp = q2.powf(ksq);
        k2extra += ksq * qp;
        let kspi = PI * kf;
        k3extra += (sqrt3z + kspi) * (sqrt3z - kspi) * ksq * qp;
    }
    kk[2] += k2extra * pi2 * SQRT_2PI / (-36.0 * z3);
    kk[3] += k3extra * pi2 * SQRT_2PI / (216.0 * z6);
    kk.iter()
        .enumerate()
        .map(|(i, s)| s / n.powf(i as f64 / 2.0))
        .sum()
}

/// P(D_n^+ >= x), the one-sided Smirnov statistic (Birnbaum–Tingey sum,
/// evaluated in logs). Used by [`kolmogorov_n_sf`] for x >= 1.48/sqrt(n) (n >
/// 140) or x > 2/sqrt(n) (n <= 140), where the lower sum is accurate.
fn smirnov_sf(n: u64, x: f64) -> f64 {
    let nf = n as f64;
    if n == 1 {
        return 1.0 - x;
    }
    if x <= 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    // floor(n x) and its remainder.
    let mut nxfl = (nf * x).floor();
    let mut alpha = nf.mul_add(x, -nxfl);
    if alpha < 0.0 {
        nxfl -= 1.0;
        alpha += 1.0;
    }
    if alpha >= 1.0 {
        nxfl += 1.0;
        alpha = 0.0;
    }
    let nxfl = nxfl as u64;
    if nxfl == 0 || (nxfl == 1 && alpha == 0.0) {
        return 1.0 - x * (1.0 + x).powf(nf - 1.0);
    }
    if -2.0 * nf * x * x < MIN_LOG {
        return 0.0;
    }
    if nxfl >= n - 1 {
        return (1.0 - x).powf(nf);
    }
    if n > 1_000_000 {
        // scipy's approximation p ~ exp(-(6nx+1)^2 / 18n).
        return (-(6.0 * nf * x + 1.0).powi(2) / 18.0 / nf).exp();
    }
    // Birnbaum–Tingey: x times the sum over v = 0 ..= n - floor(n x) - 1 (the
    // v < n(1 - x)) of A_v = C(n, v) (1 - x - v/n)^(n - v) (x + v/n)^(v - 1),
    // stopping as scipy does. ln A_v is assembled from terms of size ~n x (not
    // ~n ln n) so that it keeps ~1e-13 relative accuracy for large n:
    // ln A_v = ½ ln(n / (2π v (n - v))) + δ(n) − δ(v) − δ(n − v)
    //        + (n − v) ln1p(−n x / (n − v)) + v ln1p(n x / v) − ln((v + n x) / n),
    // δ being Stirling's error term (A_0 = (1 − x)^n / x).
    let nx = nf * x;
    let n_terms = n - nxfl;
    let mut sum = 0.0;
    for v in 0..n_terms {
        let ln_term = if v == 0 {
            nf * (-x).ln_1p() - x.ln()
        } else {
            let (vf, rest) = (v as f64, (n - v) as f64);
            0.5 * (nf / (2.0 * std::f64::consts::PI * vf * rest)).ln() + stirling_error(n)
                - stirling_error(v)
                - stirling_error(n - v)
                + rest * (-nx / rest).ln_1p()
                + vf * (nx / vf).ln_1p()
                - ((vf + nx) / nf).ln()
        };
        let term = ln_term.exp();
        sum += term;
        if term != 0.0 {
            if 4.0 * (n_terms - v) as f64 * term < f64::EPSILON * sum && v != n_terms - 1 {
                break;
            }
        } else if v > n / 2 {
            break;
        }
    }
    (x * sum).clamp(0.0, 1.0)
}

/// δ(k) = ln k! − (k ln k − k + ½ ln(2π k)), k >= 1.
fn stirling_error(k: u64) -> f64 {
    let kf = k as f64;
    if k < 16 {
        let ln_fact: f64 = (2..=k).map(|i| (i as f64).ln()).sum();
        return ln_fact - (kf * kf.ln() - kf + 0.5 * (2.0 * std::f64::consts::PI * kf).ln());
    }
    let r = 1.0 / kf;
    let r2 = r * r;
    r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0 - r2 / 1188.0))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, reference, rel_err};

    #[test]
    fn kolmogorov_distribution_matches_scipy_kstwo() {
        let mut worst = 0.0f64;
        for r in reference().kstwo_sf {
            let got = kolmogorov_n_sf(r.n, r.x);
            worst = worst.max(if r.sf < 1e-300 {
                0.0
            } else {
                rel_err(got, r.sf)
            });
            assert_close(
                &format!("kstwo.sf({}, {})", r.x, r.n),
                got,
                r.sf,
                1e-10,
                1e-300,
            );
        }
        eprintln!("kstwo.sf: max relative error {worst:.2e}");
    }
}
