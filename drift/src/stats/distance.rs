//! KS statistic and Wasserstein distance between the reference and the
//! current values: exact (two sorted samples) or against a quantile sketch
//! (the piecewise-linear CDF through its knots).

/// Two-sample KS statistic of two sorted non-empty samples (scipy's).
pub(crate) fn ks_statistic_exact(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < a.len() || j < b.len() {
        let v = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (None, None) => break,
        };
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    d
}

/// `scipy.stats.wasserstein_distance` of two sorted non-empty samples.
pub(crate) fn wasserstein_exact(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j) = (0usize, 0usize);
    let mut v = a[0].min(b[0]);
    let mut total = 0.0;
    loop {
        while i < a.len() && a[i] <= v {
            i += 1;
        }
        while j < b.len() && b[j] <= v {
            j += 1;
        }
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (None, None) => break,
        };
        total += (i as f64 / na - j as f64 / nb).abs() * (next - v);
        v = next;
    }
    total
}

/// CDF of the sketch distribution (linear between knots q_k ↦ k/K), right-continuous.
fn sketch_cdf(q: &[f64], x: f64) -> f64 {
    let kk = q.len() - 1;
    if x < q[0] {
        return 0.0;
    }
    if x >= q[kk] {
        return 1.0;
    }
    let k = q.partition_point(|&v| v <= x) - 1; // q[k] <= x < q[k + 1]
    (k as f64 + (x - q[k]) / (q[k + 1] - q[k])) / kk as f64
}

/// Left limit of [`sketch_cdf`] at x.
fn sketch_cdf_left(q: &[f64], x: f64) -> f64 {
    let kk = q.len() - 1;
    if x <= q[0] {
        return 0.0;
    }
    if x > q[kk] {
        return 1.0;
    }
    let k = q.partition_point(|&v| v < x); // q[k - 1] < x <= q[k]
    ((k - 1) as f64 + (x - q[k - 1]) / (q[k] - q[k - 1])) / kk as f64
}

/// KS statistic between the sketch distribution and the ECDF of `cur` (sorted).
pub(crate) fn ks_statistic_sketch(q: &[f64], cur: &[f64]) -> f64 {
    let m = cur.len() as f64;
    let (mut j, mut d) = (0usize, 0.0f64);
    while j < cur.len() {
        let c = cur[j];
        let below = j;
        while j < cur.len() && cur[j] <= c {
            j += 1;
        }
        d = d
            .max(sketch_cdf_left(q, c) - below as f64 / m)
            .max(j as f64 / m - sketch_cdf(q, c));
    }
    d
}

/// W1 = ∫ |F_sketch − F_cur| dx, exact for the piecewise-linear sketch CDF.
pub(crate) fn wasserstein_sketch(q: &[f64], cur: &[f64]) -> f64 {
    let mut points = Vec::with_capacity(q.len() + cur.len());
    let (mut i, mut j) = (0usize, 0usize);
    while i < q.len() || j < cur.len() {
        let take_q = j == cur.len() || (i < q.len() && q[i] <= cur[j]);
        let v = if take_q {
            i += 1;
            q[i - 1]
        } else {
            j += 1;
            cur[j - 1]
        };
        if points.last() != Some(&v) {
            points.push(v);
        }
    }
    let m = cur.len() as f64;
    let mut below = 0usize; // current values <= a
    let mut total = 0.0;
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        while below < cur.len() && cur[below] <= a {
            below += 1;
        }
        let fc = below as f64 / m;
        let y0 = sketch_cdf(q, a) - fc;
        let y1 = sketch_cdf_left(q, b) - fc;
        let width = b - a;
        total += if (y0 >= 0.0) == (y1 >= 0.0) || y0 == 0.0 || y1 == 0.0 {
            (y0.abs() + y1.abs()) / 2.0 * width
        } else {
            (y0 * y0 + y1 * y1) / (2.0 * (y0.abs() + y1.abs())) * width
        };
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NumericBaseline;
    use crate::testutil::assert_close;

    #[test]
    fn sketch_statistics_are_exact_for_a_uniform_reference() {
        // A reference of 4097 evenly spaced values: the sketch CDF is the
        // uniform CDF on [0, 1], so the statistics have closed forms.
        let values: Vec<f64> = (0..=4096).map(|i| i as f64 / 4096.0).collect();
        let b = NumericBaseline::from_values(&values);
        assert!(!b.sketch.exact);
        let cur = [0.25];
        // F_ref(x) = x; ECDF jumps 0 → 1 at 0.25.
        assert_close(
            "ks",
            ks_statistic_sketch(&b.sketch.values, &cur),
            0.75,
            1e-12,
            0.0,
        );
        // ∫0^.25 x dx + ∫.25^1 (1 - x) dx = 1/32 + 9/32.
        assert_close(
            "w1",
            wasserstein_sketch(&b.sketch.values, &cur),
            10.0 / 32.0,
            1e-12,
            0.0,
        );
        let shifted: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0 + 2.0).collect();
        assert_close(
            "w1 shift",
            wasserstein_sketch(&b.sketch.values, &shifted),
            2.0 - 0.0005,
            1e-12,
            0.0,
        );
        assert_eq!(ks_statistic_sketch(&b.sketch.values, &shifted), 1.0);
    }
}
