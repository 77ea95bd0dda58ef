//! Sums, quantiles, bins and the two binned divergences (PSI and
//! Jensen–Shannon).

/// Floor applied to proportions in the PSI.
pub const PSI_FLOOR: f64 = 1e-4;

/// Neumaier's compensated sum (the rounding error does not grow with the count).
pub(crate) fn neumaier_sum(values: impl Iterator<Item = f64>) -> f64 {
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for x in values {
        let t = sum + x;
        if sum.abs() >= x.abs() {
            comp += (sum - t) + x;
        } else {
            comp += (x - t) + sum;
        }
        sum = t;
    }
    sum + comp
}

/// `np.quantile(sorted, p, method="linear")` bit for bit (`sorted` non-empty).
pub(crate) fn quantile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let virt = (n - 1) as f64 * p;
    if virt >= (n - 1) as f64 {
        return sorted[n - 1];
    }
    if virt <= 0.0 {
        return sorted[0];
    }
    let prev = virt.floor();
    let i = prev as usize;
    let (a, b, t) = (sorted[i], sorted[i + 1], virt - prev);
    // numpy's _lerp: a + (b - a) t, or b - (b - a)(1 - t) when t >= 0.5.
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// Proportion of `values` in each left-closed bin delimited by `edges`.
pub(crate) fn bin_proportions(values: &[f64], edges: &[f64]) -> Vec<f64> {
    let mut counts = vec![0u64; edges.len() + 1];
    for &x in values {
        counts[edges.partition_point(|&e| e <= x)] += 1;
    }
    counts
        .iter()
        .map(|&c| c as f64 / values.len() as f64)
        .collect()
}

/// PSI with both proportions floored at [`PSI_FLOOR`], natural log.
pub(crate) fn psi(reference: &[f64], current: &[f64]) -> f64 {
    reference
        .iter()
        .zip(current)
        .map(|(&r, &c)| {
            let (r, c) = (r.max(PSI_FLOOR), c.max(PSI_FLOOR));
            (c - r) * (c / r).ln()
        })
        .sum()
}

/// `scipy.special.rel_entr` for non-negative inputs with y > 0 wherever x > 0.
fn rel_entr(x: f64, y: f64) -> f64 {
    if x > 0.0 && y > 0.0 {
        x * (x / y).ln()
    } else {
        0.0
    }
}

/// `scipy.spatial.distance.jensenshannon(p, q)` (natural log): weights are
/// normalised to sum 1; the result is the distance, sqrt of the divergence.
pub(crate) fn jensen_shannon(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    let (mut left, mut right) = (0.0, 0.0);
    for (&a, &b) in p.iter().zip(q) {
        let (a, b) = (a / sp, b / sq);
        let m = (a + b) / 2.0;
        left += rel_entr(a, m);
        right += rel_entr(b, m);
    }
    ((left + right) / 2.0).max(0.0).sqrt()
}
