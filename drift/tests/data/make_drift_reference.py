#!/usr/bin/env python3
"""Generate drift/tests/data/drift_reference.json for the ferry-drift crate (drift/src).

Every expected value comes from numpy/scipy (plus Evidently's formula for the
normalised Wasserstein distance), computed on the very arrays written to the
JSON: values are rounded to 6 decimals *before* anything is computed, so the
Rust tests and this script read identical f64 inputs.

Run from anywhere:  python3 make_drift_reference.py   (needs numpy, scipy)
Versions used for the committed file are recorded in the JSON ("generator").
"""
import json
import math
import os
import struct

import numpy as np
import scipy
from scipy import stats
from scipy.spatial.distance import jensenshannon
from scipy.stats import _stats_py

SEED = 20240501
BINS = 10
FLOOR = 1e-4
SKETCH_K = 2048
EXACT_MAX = 2048
LARGE_REFERENCE = 1000


def bits(values):
    """IEEE-754 bit patterns: JSON integers, read back exactly by any parser."""
    return [struct.unpack("<Q", struct.pack("<d", float(v)))[0] for v in values]


def r6(a):
    return np.round(np.asarray(a, dtype=float), 6)


def with_nan(rng, a, frac):
    a = a.copy()
    a[rng.random(a.size) < frac] = np.nan
    return a


def js_props(p, q):
    return float(jensenshannon(p, q))  # natural log, distance = sqrt(divergence)


def psi_props(p, q):
    p = np.maximum(p, FLOOR)
    q = np.maximum(q, FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def bin_props(values, edges):
    idx = np.searchsorted(edges, values, side="right")  # left-closed bins
    return np.bincount(idx, minlength=BINS) / values.size


def sketch_w1_and_ks(q, cur):
    """Quantile-space cross-check for the n > 2048 sketch.

    The reference is the continuous distribution whose quantile function is the
    piecewise-linear interpolation of q at p = k/K (K = len(q) - 1); the current
    sample is its ECDF.  W1 = integral_0^1 |Q_ref(p) - Q_cur(p)| dp, computed in
    closed form per p-interval (a different formulation from the Rust code,
    which integrates |F_ref - F_cur| over x).
    """
    K = len(q) - 1
    c = np.sort(cur)
    m = c.size
    ps = np.union1d(np.arange(K + 1) / K, np.arange(m + 1) / m)
    w = 0.0
    for a, b in zip(ps[:-1], ps[1:]):
        if b <= a:
            continue
        mid = (a + b) / 2
        qc = c[min(int(math.floor(mid * m)), m - 1)]
        k = min(int(math.floor(mid * K)), K - 1)

        def qr(p):
            t = p * K - k
            return q[k] + t * (q[k + 1] - q[k])

        y0, y1 = qr(a) - qc, qr(b) - qc
        if y0 * y1 >= 0:
            w += (abs(y0) + abs(y1)) / 2 * (b - a)
        else:
            w += (y0 * y0 + y1 * y1) / (2 * (abs(y0) + abs(y1))) * (b - a)
    # KS against the piecewise-linear CDF (right-continuous; ties in q are jumps).
    def f_right(x):
        if x < q[0]:
            return 0.0
        if x >= q[K]:
            return 1.0
        k = int(np.searchsorted(q, x, side="right")) - 1
        return (k + (x - q[k]) / (q[k + 1] - q[k])) / K

    def f_left(x):
        if x <= q[0]:
            return 0.0
        if x > q[K]:
            return 1.0
        k = int(np.searchsorted(q, x, side="left"))
        return (k - 1 + (x - q[k - 1]) / (q[k] - q[k - 1])) / K

    d = 0.0
    for x in np.unique(c):
        below = np.searchsorted(c, x, side="left") / m
        upto = np.searchsorted(c, x, side="right") / m
        d = max(d, f_left(x) - below, upto - f_right(x))
    return float(w), float(d)


def scipy_ks_pvalues(n1, n2, d):
    """(exact-or-None, asymp) exactly as scipy.stats.ks_2samp computes them."""
    g = math.gcd(n1, n2)
    ok, _, p_exact = _stats_py._attempt_exact_2kssamp(n1, n2, g, d, "two-sided")
    m, n = sorted([float(n1), float(n2)], reverse=True)
    en = m * n / (m + n)
    p_asymp = float(np.clip(stats.kstwo.sf(d, np.round(en)), 0, 1))
    return (float(p_exact) if ok else None), p_asymp


def numeric_case(name, ref, cur):
    r = ref[~np.isnan(ref)]
    c = cur[~np.isnan(cur)]
    rs = np.sort(r)
    edges = np.quantile(rs, np.arange(1, BINS) / BINS)  # method="linear"
    ref_p = bin_props(r, edges)
    cur_p = bin_props(c, edges)
    ks_auto = stats.ks_2samp(r, c, method="auto")
    ks_asymp = stats.ks_2samp(r, c, method="asymp")
    wd = float(stats.wasserstein_distance(r, c))
    std_pop = float(np.std(r))
    wd_norm = wd / max(std_pop, 0.001)  # Evidently's wasserstein_distance_norm
    exact = r.size <= EXACT_MAX
    out = {
        "name": name,
        "ref": [None if math.isnan(v) else float(v) for v in ref],
        "cur": [None if math.isnan(v) else float(v) for v in cur],
        "n": int(r.size),
        "missing": int(np.isnan(ref).sum()),
        "cur_missing": int(np.isnan(cur).sum()),
        "mean": float(np.mean(r)),
        "std": float(np.std(r, ddof=1)),
        "std_pop": std_pop,
        "min": float(np.min(r)),
        "max": float(np.max(r)),
        "edges_bits": bits(edges),
        "ref_props": ref_p.tolist(),
        "cur_props": cur_p.tolist(),
        "psi": psi_props(ref_p, cur_p),
        "jensen_shannon": js_props(ref_p, cur_p),
        "ks_statistic": float(ks_auto.statistic),
        "ks_pvalue_auto": float(ks_auto.pvalue),
        "ks_pvalue_asymp": float(ks_asymp.pvalue),
        "wasserstein": wd,
        "wasserstein_normed": wd_norm,
        "sketch_exact": bool(exact),
    }
    if not exact:
        q = np.quantile(rs, np.arange(SKETCH_K + 1) / SKETCH_K)
        out["sketch_bits"] = bits(q)
        w_sk, d_sk = sketch_w1_and_ks(q, c)
        out["sketch_wasserstein"] = w_sk
        out["sketch_ks_statistic"] = d_sk
        p_ex, p_as = scipy_ks_pvalues(r.size, c.size, d_sk)
        out["sketch_ks_pvalue_exact"] = p_ex
        out["sketch_ks_pvalue_asymp"] = p_as
    if r.size > LARGE_REFERENCE:
        out["default_method"] = "wasserstein"
        out["default_drifted"] = bool(wd_norm >= 0.1)
    else:
        out["default_method"] = "ks"
        out["default_drifted"] = bool(ks_auto.pvalue < 0.05)
    return out


def categorical_case(name, rng, cats, ref_probs, n_ref, cur_cats, cur_probs, n_cur,
                     ref_missing=0, cur_missing=0):
    ref = rng.choice(cats, size=n_ref, p=ref_probs)
    cur = rng.choice(cur_cats, size=n_cur, p=cur_probs)
    ref_counts = {k: int(v) for k, v in zip(*np.unique(ref, return_counts=True))}
    cur_counts = {k: int(v) for k, v in zip(*np.unique(cur, return_counts=True))}
    union = sorted(set(ref_counts) | set(cur_counts))
    rc = np.array([ref_counts.get(k, 0) for k in union], dtype=float)
    cc = np.array([cur_counts.get(k, 0) for k in union], dtype=float)
    nr, nc = rc.sum(), cc.sum()
    # chi-square goodness of fit: categories unseen in the reference get an
    # expected proportion of half an observation (0.5 / n_ref), then the
    # expected proportions are renormalised so sum(f_exp) == sum(f_obs).
    e = np.where(rc > 0, rc / nr, 0.5 / nr)
    e = e / e.sum()
    f_exp = e * nc
    chi = stats.chisquare(cc, f_exp)
    js = js_props(rc, cc)
    psi = psi_props(rc / nr, cc / nc)
    if nr > LARGE_REFERENCE:
        method, drifted = "jensen_shannon", bool(js >= 0.1)
    else:
        method, drifted = "chi2", bool(chi.pvalue < 0.05)
    return {
        "name": name,
        "ref_counts": ref_counts,
        "cur_counts": cur_counts,
        "ref_missing": ref_missing,
        "cur_missing": cur_missing,
        "n": int(nr),
        "psi": psi,
        "jensen_shannon": js,
        "chi2_statistic": float(chi.statistic),
        "chi2_pvalue": float(chi.pvalue),
        "default_method": method,
        "default_drifted": drifted,
    }


def main():
    rng = np.random.default_rng(SEED)
    numeric = [
        ("same_normal", r6(rng.normal(0, 1, 1000)), r6(rng.normal(0, 1, 800))),
        ("shifted_normal", r6(rng.normal(0, 1, 1000)), r6(rng.normal(0.5, 1, 1000))),
        ("scaled_normal", r6(rng.normal(0, 1, 1500)), r6(rng.normal(0, 1.5, 1200))),
        ("uniform_shift", r6(rng.uniform(0, 1, 900)), r6(rng.uniform(0.1, 1.1, 700))),
        ("small", r6(rng.normal(0, 1, 200)), r6(rng.normal(0.3, 1, 150))),
        ("discrete_ties", rng.integers(0, 6, 600).astype(float),
         rng.poisson(2.5, 500).astype(float)),
        ("with_missing", with_nan(rng, r6(rng.normal(5, 3, 700)), 0.05),
         with_nan(rng, r6(rng.normal(5, 3, 600)), 0.2)),
        ("large_sketch", r6(rng.normal(10, 2, 5000)), r6(rng.normal(10.2, 2, 3000))),
        ("large_asymp", r6(rng.exponential(1.0, 3000)), r6(rng.exponential(1.1, 12000))),
        ("large_discrete", rng.integers(0, 8, 4000).astype(float),
         rng.integers(0, 9, 2000).astype(float)),
    ]
    cases = [numeric_case(n, a, b) for n, a, b in numeric]

    categorical = [
        categorical_case("cat_shift_unseen", rng, ["a", "b", "c", "d"], [0.4, 0.3, 0.2, 0.1], 2000,
                         ["a", "b", "c", "d", "e"], [0.3, 0.3, 0.2, 0.15, 0.05], 1500),
        categorical_case("cat_small_same", rng, ["x", "y", "z"], [0.5, 0.3, 0.2], 500,
                         ["x", "y", "z"], [0.5, 0.3, 0.2], 400, ref_missing=7, cur_missing=3),
        categorical_case("cat_small_unseen", rng, ["red", "green", "blue"], [0.6, 0.3, 0.1], 300,
                         ["red", "green", "blue", "violet"], [0.55, 0.3, 0.1, 0.05], 200),
    ]

    kstwo = []
    for n in [1, 2, 3, 5, 10, 37, 100, 140, 141, 250, 1000, 4000, 20000, 150000]:
        xs = set()
        for t in [0.6, 0.9, 1.5]:
            xs.add(t / n)
        for nx2 in [0.1, 0.3, 0.6, 0.75, 0.9, 1.5, 2.1, 2.5, 3.9, 4.5, 10.0, 40.0, 200.0, 360.0]:
            xs.add(math.sqrt(nx2 / n))
        xs.update([0.3, 0.45, 0.55, 0.8, 1.0 - 1.5 / n, 1.0 - 0.5 / n])
        for x in sorted(xs):
            if 0.0 < x < 1.0:
                kstwo.append({"n": n, "x": x, "sf": float(stats.kstwo.sf(x, n))})

    ks2 = []
    pairs = [(10, 10), (37, 53), (200, 150), (1000, 800), (1000, 1000), (700, 3000),
             (2048, 10000), (150, 9999), (5000, 12000), (30, 20000)]
    for n1, n2 in pairs:
        g = math.gcd(n1, n2)
        lcm = n1 // g * n2
        for d in [0.0, 1.0 / lcm, 0.01, 0.03, 0.05, 0.08, 0.15, 0.3, 0.6, 0.95]:
            h = round(d * lcm)
            d = h / lcm
            p_ex, p_as = scipy_ks_pvalues(n1, n2, d)
            ks2.append({"n1": n1, "n2": n2, "d": d, "p_exact": p_ex, "p_asymp": p_as})

    chi2 = []
    for df in [1, 2, 3, 4, 7, 10, 25, 100, 999]:
        for x in [0.0, 1e-3, 0.5, 1.0, 2.0, 5.0, 9.0, 20.0, 60.0, 150.0, 400.0, 1200.0]:
            chi2.append({"df": df, "x": x, "sf": float(stats.chi2.sf(x, df))})

    doc = {
        "generator": {
            "script": "make_drift_reference.py",
            "seed": SEED,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "numeric": cases,
        "categorical": categorical,
        "kstwo_sf": kstwo,
        "ks_2samp_pvalue": ks2,
        "chi2_sf": chi2,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drift_reference.json")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
