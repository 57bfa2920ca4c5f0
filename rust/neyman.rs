//! Exact integer Neyman allocation:
//!
//! ```text
//! minimise Σ v_i / n_i   subject to   Σ n_i = B,   lo ≤ n_i ≤ hi,   n_i integer.
//! ```
//!
//! The objective is separable and convex, so greedily handing out rollouts by largest marginal
//! gain `g_i(n) = v_i/n − v_i/(n+1) = v_i / (n(n+1))` is exact. Units (prompt i, level n) are
//! ranked by the total order
//!
//! ```text
//! gain descending, then level n ascending, then prompt index ascending
//! ```
//!
//! and the answer is "every prompt at its lower bound plus the top K units", K = B − Σ lower.
//! For each prompt its units rank in level order, so the chosen units form a prefix per prompt.
//!
//! The fast path never runs the greedy loop. It finds a threshold λ on the gain, in the variable
//! t = 1/√λ (a prompt has about σ_i·t units above λ, σ_i = √v_i):
//! 1. cheap vectorised passes count the units above λ approximately (no division); Newton steps
//!    with the slope of the continuous relaxation Σ clamp(σ_i t, lo, hi), then regula falsi,
//!    find a bracket `[t_low, t_high]` whose counts straddle K with few units between them;
//! 2. one exact pass: every unit with gain above the bracket is taken (closed-form counts,
//!    verified against the gains with a margin, else settled by comparing gains), the units
//!    inside it are collected and the missing ones picked by `select_nth_unstable` under the
//!    unit order.
//!
//! Step 2 compares the float64 gains themselves, so the result equals the greedy on those values
//! bit for bit, ties included. Step 1 only decides how many units land in the candidate set.
//! Passes over large inputs run on the rayon pool (`parallel.rs`).

use crate::parallel::{map_chunks, map_chunks_mut, CHUNK_LEN};
use std::cmp::Ordering;

/// Marginal gain of the rollout taking a prompt from `n` to `n + 1` rollouts. Every comparison in
/// this module goes through this one definition. Zero-variance prompts have gain 0 at every level;
/// a positive-variance prompt at level 0 has infinite gain (it is never asked for: see `solve`).
#[inline]
pub fn marginal_gain(v: f64, n: u64) -> f64 {
    if v == 0.0 {
        0.0
    } else {
        v / ((n as f64) * ((n + 1) as f64))
    }
}

/// One rollout: raising prompt `index` from `level` to `level + 1`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    gain: f64,
    level: u64,
    index: usize,
}

/// The greedy's order: larger gain first; among equal gains the prompt with fewer rollouts so far,
/// then the lower index.
fn unit_order(a: &Unit, b: &Unit) -> Ordering {
    b.gain
        .total_cmp(&a.gain)
        .then(a.level.cmp(&b.level))
        .then(a.index.cmp(&b.index))
}

/// Runs a kernel compiled for AVX2 when the CPU has it, else for baseline x86-64 (2-wide SSE2).
/// The kernels are written branch-free so that LLVM vectorises them; Rust never contracts
/// float operations, so both builds compute identical values.
macro_rules! dispatch {
    ($generic:ident, $avx2:ident, fn($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the function was compiled for.
                return unsafe { $avx2($($arg),*) };
            }
        }
        return $generic($($arg),*);
    };
}

/// Accumulator lanes of the vectorised passes.
const LANES: usize = 8;

/// Facts about the variances gathered in one validating pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scan {
    /// First index holding a NaN, infinite or negative value.
    pub first_invalid: Option<usize>,
    /// Number of prompts with v > 0.
    pub positive: u64,
    /// Number of units with positive gain when positive prompts start at max(lo, 1).
    pub positive_units: u64,
}

/// Variance above which even the last unit's gain v/((hi−1)·hi) is a normal float, hence > 0.
fn no_underflow(hi: u64) -> f64 {
    f64::MIN_POSITIVE * 4.0 * (hi as f64) * (hi as f64)
}

pub fn scan(v: &[f64], lo: u64, hi: u64) -> Scan {
    let lower = lo.max(1);
    let parts = map_chunks(v, |offset, chunk| {
        let mut part = scan_chunk(chunk, lower, hi);
        if part.first_invalid.is_some() {
            part.first_invalid = chunk
                .iter()
                .position(|&x| !(0.0..f64::INFINITY).contains(&x))
                .map(|j| offset + j);
        }
        part
    });
    let mut total = Scan::default();
    for part in parts {
        total.first_invalid = total.first_invalid.or(part.first_invalid);
        total.positive += part.positive;
        total.positive_units += part.positive_units;
    }
    total
}

fn scan_chunk(chunk: &[f64], lower: u64, hi: u64) -> Scan {
    dispatch!(
        scan_chunk_generic,
        scan_chunk_avx2,
        fn(chunk: &[f64], lower: u64, hi: u64) -> Scan
    );
}

#[inline(always)]
#[allow(clippy::manual_range_contains)] // `&` rather than `&&` keeps the loop branch-free
fn scan_chunk_generic(chunk: &[f64], lower: u64, hi: u64) -> Scan {
    let full = hi.saturating_sub(lower);
    let safe = no_underflow(hi);
    // Integer counts only: the loop vectoriser handles these reductions (not float sums).
    let (mut invalid, mut tiny, mut positive, mut at_full) = (0u64, 0u64, 0u64, 0u64);
    for &x in chunk {
        invalid += !((x >= 0.0) & (x <= f64::MAX)) as u64;
        positive += (x > 0.0) as u64;
        tiny += ((x > 0.0) & (x < safe)) as u64;
        at_full += (x >= safe) as u64;
    }
    let units = at_full * full;
    let mut positive_units = units;
    if tiny > 0 && invalid == 0 {
        // Variances so small that their last gains underflow to 0: count those exactly.
        positive_units += chunk
            .iter()
            .filter(|&&x| x > 0.0 && x < safe)
            .map(|&x| count_above(x, lower, hi, 0.0))
            .sum::<u64>();
    }
    Scan {
        first_invalid: (invalid > 0).then_some(0),
        positive,
        positive_units,
    }
}

/// `true` for a usable scale entry: finite and > 0.
#[inline(always)]
fn valid_scale(y: f64) -> bool {
    (y > 0.0) & (y <= f64::MAX)
}

/// [`scan`] of the weights w_i = v_i·s_i (the float64 products) without storing them.
/// `first_invalid` is the first index where s_i is not finite and > 0 or w_i is not finite and
/// ≥ 0 (which covers every invalid v_i); the caller names the culprit.
pub fn scan_scaled(v: &[f64], s: &[f64], lo: u64, hi: u64) -> Scan {
    debug_assert_eq!(v.len(), s.len());
    let lower = lo.max(1);
    let parts = map_chunks(v, |offset, chunk| {
        let sc = &s[offset..offset + chunk.len()];
        let mut part = scan_scaled_chunk(chunk, sc, lower, hi);
        if part.first_invalid.is_some() {
            part.first_invalid = chunk
                .iter()
                .zip(sc)
                .position(|(&x, &y)| !(valid_scale(y) && (0.0..f64::INFINITY).contains(&(x * y))))
                .map(|j| offset + j);
        }
        part
    });
    let mut total = Scan::default();
    for part in parts {
        total.first_invalid = total.first_invalid.or(part.first_invalid);
        total.positive += part.positive;
        total.positive_units += part.positive_units;
    }
    total
}

fn scan_scaled_chunk(v: &[f64], s: &[f64], lower: u64, hi: u64) -> Scan {
    dispatch!(
        scan_scaled_chunk_generic,
        scan_scaled_chunk_avx2,
        fn(v: &[f64], s: &[f64], lower: u64, hi: u64) -> Scan
    );
}

/// `scan_chunk_generic` on the products v·s.
#[inline(always)]
#[allow(clippy::manual_range_contains)] // `&` rather than `&&` keeps the loop branch-free
fn scan_scaled_chunk_generic(v: &[f64], s: &[f64], lower: u64, hi: u64) -> Scan {
    let full = hi.saturating_sub(lower);
    let safe = no_underflow(hi);
    let (mut invalid, mut tiny, mut positive, mut at_full) = (0u64, 0u64, 0u64, 0u64);
    for (&a, &y) in v.iter().zip(s) {
        let x = a * y;
        invalid += !((x >= 0.0) & (x <= f64::MAX) & valid_scale(y)) as u64;
        positive += (x > 0.0) as u64;
        tiny += ((x > 0.0) & (x < safe)) as u64;
        at_full += (x >= safe) as u64;
    }
    let mut positive_units = at_full * full;
    if tiny > 0 && invalid == 0 {
        positive_units += v
            .iter()
            .zip(s)
            .map(|(&a, &y)| a * y)
            .filter(|&x| x > 0.0 && x < safe)
            .map(|x| count_above(x, lower, hi, 0.0))
            .sum::<u64>();
    }
    Scan {
        first_invalid: (invalid > 0).then_some(0),
        positive,
        positive_units,
    }
}

/// The products w = v·s, stored (in parallel for large inputs).
pub fn products(v: &[f64], s: &[f64]) -> Vec<f64> {
    let mut w = vec![0.0f64; v.len()];
    map_chunks_mut(v, &mut w, |offset, vs, ws| {
        for ((o, &x), &y) in ws.iter_mut().zip(vs).zip(&s[offset..offset + vs.len()]) {
            *o = x * y;
        }
    });
    w
}

/// `solve(&products(v, s), …)` for validated input (`scan` from [`scan_scaled`]), bit for bit.
/// The paths decided by the scan alone (every prompt at its lower bound, or every positive
/// gain taken) read the products where they need them; the threshold search stores them.
pub fn solve_scaled(v: &[f64], s: &[f64], budget: u64, lo: u64, hi: u64, scan: &Scan) -> Vec<i64> {
    let n = v.len() as u64;
    let positive = scan.positive;
    if lo == 0 && budget < positive {
        return largest_variances(&products(v, s), budget as usize);
    }
    let lower = lo.max(1);
    let base = lo * (n - positive) + lower * positive;
    let units = budget - base;
    if units == 0 {
        let mut out = vec![0i64; v.len()];
        let (lo, lower) = (lo as i64, lower as i64);
        map_chunks_mut(v, &mut out, |offset, vs, os| {
            for ((o, &x), &y) in os.iter_mut().zip(vs).zip(&s[offset..offset + vs.len()]) {
                *o = if x * y > 0.0 { lower } else { lo };
            }
        });
        return out;
    }
    if units >= scan.positive_units {
        let (out, tiny) = zero_gain_start(v, Some(s), lo, lower, hi);
        return raise_zero_gain(v, out, tiny, lo, hi, positive, units - scan.positive_units);
    }
    solve_by_threshold(&products(v, s), lo, lower, hi, units, positive).0
}

/// Solves the allocation for validated input: finite non-negative `v`, `lo ≤ hi`,
/// `len·lo ≤ budget ≤ len·hi`; `scan` must come from `scan(v, lo, hi)`.
///
/// With `lo = 0` a positive-variance prompt left at 0 rollouts makes the objective infinite, so
/// every positive-variance prompt first gets one rollout when the budget allows it (then the result
/// is the exact finite optimum); when the budget is smaller than the number of such prompts, the
/// `budget` prompts with the largest variance get one rollout each (ties: lower index first).
pub fn solve(v: &[f64], budget: u64, lo: u64, hi: u64, scan: &Scan) -> Vec<i64> {
    let n = v.len() as u64;
    let positive = scan.positive;
    if lo == 0 && budget < positive {
        return largest_variances(v, budget as usize);
    }
    // Lower bound of positive-variance prompts; zero-variance prompts stay at `lo`.
    let lower = lo.max(1);
    let base = lo * (n - positive) + lower * positive;
    let units = budget - base;
    if units == 0 {
        return lower_bounds(v, lo, lower);
    }
    if units >= scan.positive_units {
        return fill_zero_gain(v, lo, lower, hi, positive, units - scan.positive_units);
    }
    solve_by_threshold(v, lo, lower, hi, units, positive).0
}

/// Work done by the threshold search (checked by the tests: it must stay small).
#[derive(Clone, Copy, Debug, Default)]
struct SearchWork {
    cheap_passes: usize,
    exact_passes: usize,
    candidates: usize,
}

fn solve_by_threshold(
    v: &[f64],
    lo: u64,
    lower: u64,
    hi: u64,
    units: u64,
    positive: u64,
) -> (Vec<i64>, SearchWork) {
    let mut work = SearchWork::default();
    let (t_low, t_high) = bracket_threshold(v, lower, hi, units, positive, &mut work);
    let out = take_top_units(v, lo, lower, hi, units, t_low, t_high, &mut work);
    (out, work)
}

fn lower_bounds(v: &[f64], lo: u64, lower: u64) -> Vec<i64> {
    let mut out = vec![0i64; v.len()];
    let (lo, lower) = (lo as i64, lower as i64);
    map_chunks_mut(v, &mut out, |_, vs, os| {
        for (o, &x) in os.iter_mut().zip(vs) {
            *o = if x > 0.0 { lower } else { lo };
        }
    });
    out
}

/// Budget smaller than the number of positive-variance prompts with lo = 0: one rollout each to
/// the `budget` largest variances (ties: lower index).
fn largest_variances(v: &[f64], budget: usize) -> Vec<i64> {
    let mut out = vec![0i64; v.len()];
    if budget == 0 {
        return out;
    }
    let mut candidates: Vec<usize> = (0..v.len()).filter(|&i| v[i] > 0.0).collect();
    candidates.select_nth_unstable_by(budget - 1, |&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    for &i in &candidates[..budget] {
        out[i] = 1;
    }
    out
}

/// Values in this range keep gains, ratios and thresholds clear of subnormals and overflow.
const SAFE_MIN: f64 = 1e-280;
const SAFE_MAX: f64 = 1e280;
const TWO_52: f64 = 4_503_599_627_370_496.0;

/// min/max as a compare and a select (no NaN special-casing: a NaN `a` yields `b`), which
/// vectorise to two instructions.
#[inline(always)]
fn min2(a: f64, b: f64) -> f64 {
    if a < b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn max2(a: f64, b: f64) -> f64 {
    if a > b {
        a
    } else {
        b
    }
}

/// ceil(y) for 0 ≤ y ≤ 2^52 with plain adds (the `ceil` instruction needs SSE4.1).
#[inline(always)]
fn ceil_small(y: f64) -> f64 {
    let r = (y + TWO_52) - TWO_52;
    if r < y {
        r + 1.0
    } else {
        r
    }
}

/// A gain threshold λ ∈ [0, ∞] prepared for counting units above it.
#[derive(Clone, Copy, Debug)]
struct Threshold {
    lambda: f64,
    /// 1/λ: v·(1/λ) is the bound on n(n+1) for units above λ.
    inverse: f64,
    /// 1/√λ, so that σ·t ≈ √(v/λ).
    t: f64,
    /// λ is a normal, finite number: the closed form may be trusted.
    safe: bool,
}

impl Threshold {
    fn new(lambda: f64) -> Self {
        Threshold {
            lambda,
            inverse: 1.0 / lambda,
            t: 1.0 / lambda.sqrt(),
            safe: (SAFE_MIN..=SAFE_MAX).contains(&lambda),
        }
    }
}

/// Number of units `n ∈ [lower, hi)` of a prompt with gain strictly above λ.
#[inline]
fn count_above(v: f64, lower: u64, hi: u64, lambda: f64) -> u64 {
    count_above_at(v, lower, hi, &Threshold::new(lambda))
}

/// The exact count by comparing gains: a square root for the starting guess, then one or two
/// divisions (a binary search only when the guess is far off, e.g. for subnormal gains).
fn count_above_at(v: f64, lower: u64, hi: u64, th: &Threshold) -> u64 {
    if v <= 0.0 || th.lambda == f64::INFINITY || lower >= hi {
        return 0;
    }
    // gain(n) > λ  ⇔  n(n+1) < v/λ  ⇔  n < √(v/λ + 1/4) − 1/2.
    let y = (v * th.inverse + 0.25).sqrt() - 0.5;
    let guess = if y.is_finite() {
        y.max(0.0).ceil() as u64
    } else {
        hi
    };
    first_at_or_below(v, lower, hi, th.lambda, guess) - lower
}

/// Smallest `m ∈ [lower, hi]` with `m == hi` or `gain(v, m) ≤ λ`, starting from a guess. Gains do
/// not increase with the level, so "gain > λ" holds on a prefix.
fn first_at_or_below(v: f64, lower: u64, hi: u64, lambda: f64, guess: u64) -> u64 {
    let above = |n: u64| marginal_gain(v, n) > lambda;
    let m = guess.clamp(lower, hi);
    if m > lower && !above(m - 1) {
        if m - 1 == lower || above(m - 2) {
            m - 1
        } else {
            partition_point(lower, m - 2, above)
        }
    } else if m < hi && above(m) {
        if m + 1 == hi || !above(m + 1) {
            m + 1
        } else {
            partition_point(m + 2, hi, above)
        }
    } else {
        m
    }
}

/// Smallest `x ∈ [a, b]` with `x == b` or `!above(x)`, for `above` true on a prefix.
fn partition_point(mut a: u64, mut b: u64, above: impl Fn(u64) -> bool) -> u64 {
    while a < b {
        let mid = a + (b - a) / 2;
        if above(mid) {
            a = mid + 1;
        } else {
            b = mid;
        }
    }
    a
}

/// All positive-gain units are taken; `rest` units of zero gain remain. They go level by level
/// (fewer rollouts first), and within the last level to the lowest indices.
fn fill_zero_gain(v: &[f64], lo: u64, lower: u64, hi: u64, positive: u64, rest: u64) -> Vec<i64> {
    let (out, tiny) = zero_gain_start(v, None, lo, lower, hi);
    raise_zero_gain(v, out, tiny, lo, hi, positive, rest)
}

/// Start levels of `fill_zero_gain` for the weights `v` (times `s` when given): positive
/// prompts at hi (all their gains are positive), the others at lo; positive weights whose last
/// gains underflow to 0 ("tiny", counted in the second result) below hi.
fn zero_gain_start(
    v: &[f64],
    s: Option<&[f64]>,
    lo: u64,
    lower: u64,
    hi: u64,
) -> (Vec<i64>, usize) {
    let mut out = vec![0i64; v.len()];
    let safe = no_underflow(hi);
    let (lo_i, hi_i) = (lo as i64, hi as i64);
    let tiny: usize = map_chunks_mut(v, &mut out, |offset, vs, os| {
        let mut tiny = 0usize;
        match s {
            None => {
                for (o, &x) in os.iter_mut().zip(vs) {
                    tiny += ((x > 0.0) & (x < safe)) as usize;
                    *o = if x > 0.0 { hi_i } else { lo_i };
                }
            }
            Some(s) => {
                for ((o, &a), &y) in os.iter_mut().zip(vs).zip(&s[offset..offset + vs.len()]) {
                    let x = a * y;
                    tiny += ((x > 0.0) & (x < safe)) as usize;
                    *o = if x > 0.0 { hi_i } else { lo_i };
                }
            }
        }
        tiny
    })
    .into_iter()
    .sum();
    if tiny > 0 {
        for (i, o) in out.iter_mut().enumerate() {
            let x = s.map_or(v[i], |s| v[i] * s[i]);
            if x > 0.0 && x < safe {
                *o = (lower + count_above(x, lower, hi, 0.0)) as i64;
            }
        }
    }
    (out, tiny)
}

/// The rest of `fill_zero_gain` from the start levels `out` (`v` only sets the length and the
/// chunking).
fn raise_zero_gain(
    v: &[f64],
    mut out: Vec<i64>,
    tiny: usize,
    lo: u64,
    hi: u64,
    positive: u64,
    rest: u64,
) -> Vec<i64> {
    let (lo_i, hi_i) = (lo as i64, hi as i64);
    if rest == 0 {
        return out;
    }
    // Prompts below hi hold zero-gain units from their level up to hi.
    let units_below = |out: &[i64], level: i64| -> u64 {
        map_chunks(out, |_, os| {
            os.iter().map(|&o| (level - o).max(0) as u64).sum::<u64>()
        })
        .into_iter()
        .sum()
    };
    // Water level: the highest level L with (units needed to raise everyone to L) ≤ rest.
    let (level, below) = if tiny == 0 && lo < hi {
        // Every holder starts at lo: closed form.
        let holders = v.len() as u64 - positive;
        let steps = rest / holders;
        (lo_i + steps as i64, steps * holders)
    } else {
        let (mut a, mut b) = (lo_i, hi_i);
        while a < b {
            let mid = a + (b - a + 1) / 2;
            if units_below(&out, mid) <= rest {
                a = mid;
            } else {
                b = mid - 1;
            }
        }
        (a, units_below(&out, a))
    };
    let extra = rest - below;
    // Raise everyone to the level; the first `extra` prompts (by index) that were at or below it
    // get one more. Find where that stops by counting per chunk, then write in parallel.
    let eligible = |os: &[i64]| os.iter().map(|&o| (o <= level) as u64).sum::<u64>();
    let counts = if extra > 0 && level < hi_i {
        map_chunks(&out, |_, os| eligible(os))
    } else {
        Vec::new()
    };
    let mut quota = Vec::with_capacity(counts.len());
    let mut left = extra;
    for c in counts {
        quota.push(left.min(c));
        left -= left.min(c);
    }
    debug_assert_eq!(left, 0);
    map_chunks_mut(v, &mut out, |offset, _, os| {
        let mut q = quota.get(offset / CHUNK_LEN).copied().unwrap_or(0);
        for o in os.iter_mut() {
            let take = ((*o <= level) & (q > 0)) as u64;
            *o = (*o).max(level) + take as i64;
            q -= take;
        }
    });
    out
}

/// Sums of one cheap pass at `t` (λ = 1/t²) over positive-variance prompts.
#[derive(Clone, Copy, Debug, Default)]
struct Relaxed {
    /// Approximate number of units with gain > λ (the exact count up to float rounding).
    approx: f64,
    /// Slope of the continuous relaxation Σ clamp(σ t, lower, hi) in t: Σ σ over prompts
    /// strictly inside their bounds. Guides the steps in t.
    slope: f64,
}

impl Relaxed {
    fn add(self, o: Relaxed) -> Relaxed {
        Relaxed {
            approx: self.approx + o.approx,
            slope: self.slope + o.slope,
        }
    }
}

/// Levels beyond this are not told apart by the cheap passes (ceil_small's range).
const APPROX_CAP: f64 = (1u64 << 51) as f64;

/// Per-prompt terms of a cheap pass: approximate count and slope contribution.
#[inline(always)]
fn relaxed_terms(v: f64, t: f64, lower: f64, upper: f64) -> (f64, f64) {
    let sigma = v.sqrt();
    let x = sigma * t;
    // Units 0..c have n(n+1) < x², and c is ceil(x − 1/2) or one more (see closed_form_count).
    let c0 = ceil_small(min2(max2(x - 0.5, 0.0), min2(upper + 1.0, APPROX_CAP)));
    let c = c0 + if c0 * (c0 + 1.0) < x * x { 1.0 } else { 0.0 };
    let approx = min2(max2(c, lower), upper) - lower;
    let slope = if (x > lower) & (x < upper) {
        sigma
    } else {
        0.0
    };
    (approx, slope)
}

#[inline(always)]
fn relaxed_chunk_generic(v: &[f64], t: f64, lower: f64, upper: f64) -> Relaxed {
    let (mut a, mut s) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mut blocks = v.chunks_exact(LANES);
    for block in &mut blocks {
        for j in 0..LANES {
            let (da, ds) = relaxed_terms(block[j], t, lower, upper);
            a[j] += da;
            s[j] += ds;
        }
    }
    for (j, &x) in blocks.remainder().iter().enumerate() {
        let (da, ds) = relaxed_terms(x, t, lower, upper);
        a[j] += da;
        s[j] += ds;
    }
    Relaxed {
        approx: a.iter().sum(),
        slope: s.iter().sum(),
    }
}

fn relaxed_chunk(v: &[f64], t: f64, lower: f64, upper: f64) -> Relaxed {
    dispatch!(
        relaxed_chunk_generic,
        relaxed_chunk_avx2,
        fn(v: &[f64], t: f64, lower: f64, upper: f64) -> Relaxed
    );
}

/// Σ√v.
#[inline(always)]
fn sigma_sum_chunk_generic(v: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut blocks = v.chunks_exact(LANES);
    for block in &mut blocks {
        for j in 0..LANES {
            acc[j] += block[j].sqrt();
        }
    }
    acc.iter().sum::<f64>() + blocks.remainder().iter().map(|x| x.sqrt()).sum::<f64>()
}

fn sigma_sum_chunk(v: &[f64]) -> f64 {
    dispatch!(
        sigma_sum_chunk_generic,
        sigma_sum_chunk_avx2,
        fn(v: &[f64]) -> f64
    );
}

const MAX_CHEAP_PASSES: usize = 80;
const MAX_REFINE_PASSES: usize = 16;

/// Finds `t_low < t_high` whose approximate unit counts straddle `units`, with few units between.
///
/// Newton steps on the approximate count (a step function) with the relaxation's slope, each
/// overshooting by a margin that doubles until both sides are found; then regula falsi with
/// bisection until few units lie between the two ends.
fn bracket_threshold(
    v: &[f64],
    lower_u: u64,
    hi: u64,
    units: u64,
    positive: u64,
    work: &mut SearchWork,
) -> (f64, f64) {
    let target = units as f64;
    let lower = lower_u as f64;
    let upper = hi as f64;
    let n = v.len();
    // A candidate unit between the bracket ends costs about as much as 30 elements of a cheap
    // pass: stop refining once the bracket holds N/32 units. A group of tied gains makes
    // the count jump by up to one unit per prompt at a single t, which no bisection removes:
    // stop when three refinements in a row left the gap (nearly) unchanged.
    let tight = (n / 32).max(32) as f64;
    let jump_limit = n.max(32) as f64;

    // approx(t_low) ≤ target ≤ approx(t_high); t = 0 counts nothing.
    let (mut t_low, mut a_low) = (0.0f64, 0.0f64);
    let (mut t_high, mut a_high) = (f64::INFINITY, f64::INFINITY);
    let mut margin = tight / 2.0;
    let mut refine_passes = 0;
    let mut stalled = 0;
    let mut last_gap = f64::INFINITY;
    let mut last_side = 0i8;
    let sigma_sum: f64 = map_chunks(v, |_, vs| sigma_sum_chunk(vs)).into_iter().sum();
    // Start where the relaxation would be solved if no prompt sat at a bound.
    let mut t = (target + positive as f64 * lower) / sigma_sum;

    for _ in 0..MAX_CHEAP_PASSES {
        if !(t.is_finite() && t > 0.0) {
            break;
        }
        let e = map_chunks(v, |_, vs| relaxed_chunk(vs, t, lower, upper))
            .into_iter()
            .fold(Relaxed::default(), Relaxed::add);
        work.cheap_passes += 1;
        if e.approx <= target && t > t_low {
            t_low = t;
            a_low = e.approx;
        }
        if e.approx >= target && t < t_high {
            t_high = t;
            a_high = e.approx;
        }
        if t_low > 0.0 && t_high.is_finite() {
            let gap = a_high - a_low;
            stalled = if gap > 0.9 * last_gap { stalled + 1 } else { 0 };
            last_gap = gap;
            if gap <= tight
                || t_high - t_low <= 1e-12 * t_high
                || (stalled >= 3 && gap <= jump_limit)
                || refine_passes >= MAX_REFINE_PASSES
            {
                break;
            }
            // Both sides known: interpolate, bisecting when one side keeps moving (Illinois-like).
            refine_passes += 1;
            let width = t_high - t_low;
            let side = if t == t_low { -1 } else { 1 };
            t = if side == last_side {
                t_low + 0.5 * width
            } else {
                let frac = (target - a_low) / (a_high - a_low);
                t_low + frac.clamp(0.02, 0.98) * width
            };
            last_side = side;
        } else {
            // One side open: a Newton step past the target by a growing margin.
            let miss = target - e.approx;
            let step = if e.slope > 0.0 {
                (miss.abs() + margin) / e.slope
            } else {
                t
            };
            margin *= 2.0;
            t = if miss > 0.0 {
                let up = t + step;
                if t_high.is_finite() {
                    up.min(0.5 * (t + t_high))
                } else {
                    up
                }
            } else {
                (t - step).max(0.5 * t)
            };
        }
    }
    (t_low, t_high)
}

/// Relative margin by which n(n+1) must clear v/λ for the closed form to be trusted: far above
/// the few ulps by which float gains may differ from exact arithmetic.
const MARGIN: f64 = 1e-9;
/// Largest level handled by the closed form (n(n+1) stays exact in f64).
const LEVEL_CAP: f64 = (1u64 << 26) as f64;

/// The unit count above `th` of a prompt with variance `v` = σ², within [lower, upper), as a
/// float, and whether it is certain. No division or square root: units 0..c are above λ iff
/// n(n+1) < r = v/λ, and with x = σ·t ≈ √r, c is ceil(x − 1/2) or one more (because
/// n(n+1) = (n + 1/2)² − 1/4). The result is trusted when both defining inequalities hold with a
/// margin, so that the float gains compare the same way. Zero variances count 0, always trusted.
#[inline(always)]
#[allow(clippy::manual_range_contains)] // `&` rather than `&&` keeps the loop branch-free
fn closed_form_count(v: f64, sigma: f64, lower: f64, upper: f64, th: &Threshold) -> (f64, bool) {
    let r = v * th.inverse;
    let x = sigma * th.t;
    let c0 = ceil_small(min2(max2(x - 0.5, 0.0), LEVEL_CAP));
    let c = c0 + if c0 * (c0 + 1.0) < r { 1.0 } else { 0.0 };
    let sure_c = ((c - 1.0) * c < r * (1.0 - MARGIN))
        & (c * (c + 1.0) > r * (1.0 + MARGIN))
        & (c < LEVEL_CAP);
    // Or every unit below hi is above λ (also for levels beyond the cap).
    let sure_full = (upper - 1.0) * upper < r * (1.0 - MARGIN);
    let count = if sure_full {
        upper - lower
    } else {
        min2(max2(c, lower), upper) - lower
    };
    let zero = v == 0.0;
    let sure = th.safe & (v >= SAFE_MIN) & (v <= SAFE_MAX) & (sure_c | sure_full);
    (if zero { 0.0 } else { count }, sure | zero)
}

/// Integer-valued f64 in [0, 2^51) to i64 without the scalar, saturating conversion.
#[inline(always)]
fn small_f64_to_i64(x: f64) -> i64 {
    (x + TWO_52).to_bits() as i64 - TWO_52.to_bits() as i64
}

/// Counts stay below this in the vectorised exact pass (see `small_f64_to_i64`).
const VECTOR_MAX_HI: u64 = 1 << 50;
/// Elements per sub-block of the exact pass: its simple loops over stack buffers vectorise.
const EXACT_BLOCK: usize = 256;

/// Result of the exact pass over one chunk.
struct ExactChunk {
    above_high: u64,
    above_low: u64,
    candidates: Vec<Unit>,
}

/// Bounds and thresholds of the exact pass.
#[derive(Clone, Copy)]
struct ExactPass {
    lo: u64,
    lower: u64,
    hi: u64,
    /// Upper end of the bracket (fewer units above it): those units are taken.
    high: Threshold,
    /// Lower end: the units between the two are the candidates.
    low: Threshold,
}

/// One chunk of the exact pass: writes `lower + (units above high)` to `out` and collects the
/// units between the thresholds. Units above `low` beyond the first one above `high` are rare
/// (a narrow bracket), so the vectorised loop only checks the next unit against `low`.
#[inline(always)]
fn exact_chunk_generic(offset: usize, v: &[f64], out: &mut [i64], p: &ExactPass) -> ExactChunk {
    let ExactPass {
        lo,
        lower,
        hi,
        high,
        low,
    } = *p;
    let mut candidates = Vec::new();
    let (mut above_high, mut above_low) = (0u64, 0u64);
    let vectorised = if hi < VECTOR_MAX_HI && lower < hi {
        v.len()
    } else {
        0
    };
    let nothing_above_high = high.lambda == f64::INFINITY;
    let (lo_f, lower_f, upper_f) = (lo as f64, lower as f64, hi as f64);
    // a: units above `high`; b: units above `low`, or −1 where the closed form is not enough.
    let (mut a_buf, mut b_buf) = ([0.0f64; EXACT_BLOCK], [0.0f64; EXACT_BLOCK]);
    let mut need_buf = [false; EXACT_BLOCK];
    for (block, (vb, ob)) in v[..vectorised]
        .chunks(EXACT_BLOCK)
        .zip(out[..vectorised].chunks_mut(EXACT_BLOCK))
        .enumerate()
    {
        let len = vb.len();
        let (a, b, need) = (&mut a_buf[..len], &mut b_buf[..len], &mut need_buf[..len]);
        let mut unresolved = 0u64;
        for (((&x, ca), cb), nd) in vb
            .iter()
            .zip(a.iter_mut())
            .zip(b.iter_mut())
            .zip(need.iter_mut())
        {
            let (count, sure) = if nothing_above_high {
                (0.0, true)
            } else {
                closed_form_count(x, x.sqrt(), lower_f, upper_f, &high)
            };
            // Is the next unit (level lower + count) above `low` too? Usually not.
            let level = lower_f + count;
            let r = x * low.inverse;
            let next = level * (level + 1.0);
            let next_out = (level >= upper_f) | (next > r * (1.0 + MARGIN)) | (x == 0.0);
            *ca = count;
            *cb = count;
            *nd = !(sure & low.safe & next_out);
            unresolved += *nd as u64;
        }
        if unresolved > 0 {
            // Settle the flagged prompts one by one (exact counts by comparing gains if needed).
            for (((&x, ca), cb), &nd) in vb
                .iter()
                .zip(a.iter_mut())
                .zip(b.iter_mut())
                .zip(need.iter())
            {
                if !nd {
                    continue;
                }
                let s = x.sqrt();
                let (count_high, sure_high) = closed_form_count(x, s, lower_f, upper_f, &high);
                *ca = if nothing_above_high {
                    0.0
                } else if sure_high {
                    count_high
                } else {
                    count_above_at(x, lower, hi, &high) as f64
                };
                let (count_low, sure_low) = closed_form_count(x, s, lower_f, upper_f, &low);
                *cb = if sure_low {
                    count_low
                } else {
                    count_above_at(x, lower, hi, &low) as f64
                };
            }
        }
        let (mut sum_a, mut sum_b, mut gaps) = (0i64, 0i64, 0u64);
        for (((&x, o), &ca), &cb) in vb.iter().zip(ob.iter_mut()).zip(a.iter()).zip(b.iter()) {
            let base = if x > 0.0 { lower_f } else { lo_f };
            *o = small_f64_to_i64(base + ca);
            sum_a += small_f64_to_i64(ca);
            sum_b += small_f64_to_i64(cb);
            gaps += (cb > ca) as u64;
        }
        above_high += sum_a as u64;
        above_low += sum_b as u64;
        if gaps > 0 {
            for (j, ((&x, &ca), &cb)) in vb.iter().zip(a.iter()).zip(b.iter()).enumerate() {
                if cb > ca {
                    let index = offset + block * EXACT_BLOCK + j;
                    for level in lower + ca as u64..lower + cb as u64 {
                        candidates.push(Unit {
                            gain: marginal_gain(x, level),
                            level,
                            index,
                        });
                    }
                }
            }
        }
    }
    for (j, (o, &x)) in out.iter_mut().zip(v).enumerate().skip(vectorised) {
        let a = count_above_at(x, lower, hi, &high);
        let b = count_above_at(x, lower, hi, &low);
        above_high += a;
        above_low += b;
        *o = ((if x > 0.0 { lower } else { lo }) + a) as i64;
        for level in lower + a..lower + b {
            candidates.push(Unit {
                gain: marginal_gain(x, level),
                level,
                index: offset + j,
            });
        }
    }
    ExactChunk {
        above_high,
        above_low,
        candidates,
    }
}

fn exact_chunk(offset: usize, v: &[f64], out: &mut [i64], p: &ExactPass) -> ExactChunk {
    dispatch!(
        exact_chunk_generic,
        exact_chunk_avx2,
        fn(offset: usize, v: &[f64], out: &mut [i64], p: &ExactPass) -> ExactChunk
    );
}

/// Exact pass over the bracket, then selection of the missing units among the candidates.
#[allow(clippy::too_many_arguments)]
fn take_top_units(
    v: &[f64],
    lo: u64,
    lower: u64,
    hi: u64,
    units: u64,
    mut t_low: f64,
    mut t_high: f64,
    work: &mut SearchWork,
) -> Vec<i64> {
    let mut out = vec![0i64; v.len()];
    // The cheap counts may differ from the exact ones for prompts sitting on a float boundary;
    // widen slightly, and further if the exact counts still miss the target.
    let mut widen = 1e-9;
    loop {
        t_low *= 1.0 - widen;
        t_high *= 1.0 + widen;
        if widen >= 0.25 {
            t_low = 0.0;
            t_high = f64::INFINITY;
        }
        // λ = 1/t²: ∞ at t_low = 0 (nothing above it), 0 at t_high = ∞ (all positive gains).
        let pass = ExactPass {
            lo,
            lower,
            hi,
            high: Threshold::new(1.0 / (t_low * t_low)),
            low: Threshold::new(1.0 / (t_high * t_high)),
        };
        let parts = map_chunks_mut(v, &mut out, |offset, vs, os| {
            exact_chunk(offset, vs, os, &pass)
        });
        work.exact_passes += 1;
        let above_high: u64 = parts.iter().map(|p| p.above_high).sum();
        let above_low: u64 = parts.iter().map(|p| p.above_low).sum();
        if above_high <= units && units <= above_low {
            let missing = (units - above_high) as usize;
            if missing > 0 {
                let mut candidates: Vec<Unit> =
                    Vec::with_capacity((above_low - above_high) as usize);
                for part in parts {
                    candidates.extend(part.candidates);
                }
                work.candidates = candidates.len();
                candidates.select_nth_unstable_by(missing - 1, unit_order);
                for unit in &candidates[..missing] {
                    out[unit.index] += 1;
                }
            }
            return out;
        }
        widen *= 16.0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reference: the plain greedy over the unit order, one unit at a time.
    pub fn greedy(v: &[f64], budget: u64, lo: u64, hi: u64) -> Vec<i64> {
        let positive = v.iter().filter(|&&x| x > 0.0).count() as u64;
        if lo == 0 && budget < positive {
            let mut order: Vec<usize> = (0..v.len()).filter(|&i| v[i] > 0.0).collect();
            order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
            let mut out = vec![0i64; v.len()];
            for &i in &order[..budget as usize] {
                out[i] = 1;
            }
            return out;
        }
        let mut n: Vec<u64> = v
            .iter()
            .map(|&x| if x > 0.0 { lo.max(1) } else { lo })
            .collect();
        let mut left = budget - n.iter().sum::<u64>();
        while left > 0 {
            let best = (0..v.len())
                .filter(|&i| n[i] < hi)
                .map(|i| Unit {
                    gain: marginal_gain(v[i], n[i]),
                    level: n[i],
                    index: i,
                })
                .min_by(unit_order)
                .expect("feasible budget");
            n[best.index] += 1;
            left -= 1;
        }
        n.into_iter().map(|x| x as i64).collect()
    }

    /// Reference: dynamic programming over prompts, minimum of Σ v/n (∞ when v > 0 and n = 0).
    pub fn dp_objective(v: &[f64], budget: u64, lo: u64, hi: u64) -> f64 {
        let b = budget as usize;
        let mut best = vec![f64::INFINITY; b + 1];
        best[0] = 0.0;
        for &x in v {
            let mut next = vec![f64::INFINITY; b + 1];
            for (used, &cost) in best.iter().enumerate() {
                if cost == f64::INFINITY {
                    continue;
                }
                for k in lo..=hi {
                    let total = used + k as usize;
                    if total > b {
                        break;
                    }
                    let term = if x == 0.0 { 0.0 } else { x / k as f64 };
                    next[total] = next[total].min(cost + term);
                }
            }
            best = next;
        }
        best[b]
    }

    pub fn objective(v: &[f64], n: &[i64]) -> f64 {
        v.iter()
            .zip(n)
            .map(|(&x, &k)| if x == 0.0 { 0.0 } else { x / k as f64 })
            .sum()
    }

    /// Optimality certificate in O(N): the worst taken unit ranks before the best untaken one.
    pub fn assert_greedy_optimal(v: &[f64], n: &[i64], budget: u64, lo: u64, hi: u64) {
        assert_eq!(n.iter().sum::<i64>() as u64, budget);
        let mut worst_taken: Option<Unit> = None;
        let mut best_free: Option<Unit> = None;
        for (i, (&x, &k)) in v.iter().zip(n).enumerate() {
            let k = k as u64;
            let lower = if x > 0.0 { lo.max(1) } else { lo };
            assert!(
                k >= lower && k <= hi,
                "prompt {i}: {k} outside [{lower}, {hi}]"
            );
            if k > lower {
                let u = Unit {
                    gain: marginal_gain(x, k - 1),
                    level: k - 1,
                    index: i,
                };
                if worst_taken.is_none_or(|w| unit_order(&u, &w) == Ordering::Greater) {
                    worst_taken = Some(u);
                }
            }
            if k < hi {
                let u = Unit {
                    gain: marginal_gain(x, k),
                    level: k,
                    index: i,
                };
                if best_free.is_none_or(|b| unit_order(&u, &b) == Ordering::Less) {
                    best_free = Some(u);
                }
            }
        }
        if let (Some(w), Some(b)) = (worst_taken, best_free) {
            assert_eq!(
                unit_order(&w, &b),
                Ordering::Less,
                "taken {w:?} ranks after free {b:?}"
            );
        }
    }

    /// Small deterministic generator (xorshift*), so the tests need no extra crates.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
        pub fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn run(v: &[f64], budget: u64, lo: u64, hi: u64) -> Vec<i64> {
        let s = scan(v, lo, hi);
        assert_eq!(s.first_invalid, None);
        solve(v, budget, lo, hi, &s)
    }

    #[test]
    fn matches_greedy_and_dp_on_random_small_cases() {
        let mut rng = Rng::new(7);
        let palette = [0.0, 0.0, 0.25, 0.25, 0.5, 1.0, 2.0, 0.1875, 3.0];
        for case in 0..4000 {
            let n = 1 + rng.below(8) as usize;
            let lo = if case % 3 == 0 { 0 } else { rng.below(4) };
            let hi = lo + rng.below(7);
            let budget = n as u64 * lo + rng.below(n as u64 * (hi - lo) + 1);
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    if case % 2 == 0 {
                        palette[rng.below(palette.len() as u64) as usize]
                    } else if rng.below(4) == 0 {
                        0.0
                    } else {
                        rng.unit()
                    }
                })
                .collect();
            let got = run(&v, budget, lo, hi);
            let want = greedy(&v, budget, lo, hi);
            assert_eq!(got, want, "v={v:?} budget={budget} lo={lo} hi={hi}");
            let positive = v.iter().filter(|&&x| x > 0.0).count() as u64;
            if !(lo == 0 && budget < positive) {
                let best = dp_objective(&v, budget, lo, hi);
                let ours = objective(&v, &got);
                assert!(
                    (ours - best).abs() <= 1e-12 * best.max(1.0),
                    "{ours} vs {best} for {v:?}"
                );
            }
        }
    }

    #[test]
    fn ties_go_to_fewer_rollouts_then_lower_index() {
        // Gains tie at 1/2: prompt 0 (v=1) at n=1 and prompt 1 (v=3) at n=2. Fewer rollouts wins.
        assert_eq!(run(&[1.0, 3.0], 4, 1, 10), vec![2, 2]);
        // Equal variances: the lower index gets the odd rollout.
        assert_eq!(run(&[0.5, 0.5, 0.5], 7, 1, 10), vec![3, 2, 2]);
        // All zero: near-uniform, first budget mod N prompts get one more.
        assert_eq!(run(&[0.0; 4], 10, 0, 5), vec![3, 3, 2, 2]);
        // Zero-variance prompts get only what the others cannot absorb.
        assert_eq!(run(&[0.0, 1.0, 0.0], 11, 2, 5), vec![3, 5, 3]);
        assert_eq!(run(&[0.0, 1.0, 0.0], 8, 2, 5), vec![2, 4, 2]);
    }

    #[test]
    fn lo_zero_skips_and_budget_below_positive_count() {
        assert_eq!(run(&[0.0, 0.2, 0.0, 0.1], 5, 0, 8), vec![0, 3, 0, 2]);
        // Budget 2 < 3 positive prompts: the two largest variances get one each.
        assert_eq!(run(&[0.1, 0.3, 0.2, 0.0], 2, 0, 8), vec![0, 1, 1, 0]);
        assert_eq!(run(&[0.2, 0.3, 0.2], 2, 0, 8), vec![1, 1, 0]);
        assert_eq!(run(&[0.2, 0.3], 0, 0, 8), vec![0, 0]);
    }

    #[test]
    fn bounds_at_the_extremes() {
        assert_eq!(run(&[0.1, 0.0, 0.3], 24, 8, 24), vec![8, 8, 8]);
        assert_eq!(run(&[0.1, 0.0, 0.3], 72, 8, 24), vec![24, 24, 24]);
        assert_eq!(run(&[], 0, 8, 24), Vec::<i64>::new());
        assert_eq!(run(&[0.4, 0.1], 6, 3, 3), vec![3, 3]);
    }

    #[test]
    fn scan_reports_first_invalid_value() {
        assert_eq!(scan(&[0.1, f64::NAN, -1.0], 0, 4).first_invalid, Some(1));
        assert_eq!(
            scan(&[0.1, 0.2, f64::INFINITY], 0, 4).first_invalid,
            Some(2)
        );
        assert_eq!(scan(&[0.0, -0.0, 1e-300], 0, 4).first_invalid, None);
        let big: Vec<f64> = (0..200_000)
            .map(|i| if i == 150_001 { -1.0 } else { 0.5 })
            .collect();
        assert_eq!(scan(&big, 0, 4).first_invalid, Some(150_001));
    }

    #[test]
    fn subnormal_variances_are_ordered_by_their_float_gains() {
        let v = [5e-324, 1e-320, 0.0, 0.25];
        for budget in 4..=40 {
            assert_eq!(
                run(&v, budget, 1, 10),
                greedy(&v, budget, 1, 10),
                "budget {budget}"
            );
        }
        let huge = [1e300, 3e299, 1.0];
        for budget in 3..=30 {
            assert_eq!(run(&huge, budget, 1, 10), greedy(&huge, budget, 1, 10));
        }
    }

    fn pool_recipe(n: usize, seed: u64, quantised: bool) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let u = rng.unit();
                if u < 0.5 {
                    0.0 // p = 0 (30%) or p = 1 (20%)
                } else {
                    let p = rng.unit();
                    if quantised {
                        let k = (p * 16.0).floor();
                        k * (16.0 - k) / 240.0
                    } else {
                        p * (1.0 - p)
                    }
                }
            })
            .collect()
    }

    #[test]
    fn large_inputs_are_greedy_optimal() {
        for (n, quantised) in [
            (3_000usize, true),
            (3_000, false),
            (300_000, true),
            (300_000, false),
        ] {
            let v = pool_recipe(n, n as u64 + quantised as u64, quantised);
            for (lo, hi, per) in [(8u64, 24u64, 16u64), (0, 64, 16), (0, 64, 1), (4, 40, 20)] {
                let budget = per * n as u64;
                let got = run(&v, budget, lo, hi);
                assert_greedy_optimal(&v, &got, budget, lo, hi);
            }
        }
    }

    #[test]
    fn large_inputs_match_greedy_exactly() {
        let v = pool_recipe(2_000, 11, true);
        for (lo, hi, budget) in [(8u64, 24u64, 32_000u64), (0, 64, 20_000), (0, 30, 500)] {
            assert_eq!(run(&v, budget, lo, hi), greedy(&v, budget, lo, hi));
        }
    }

    #[test]
    fn threshold_search_does_little_work() {
        // Biased relaxations (many tied estimates), continuous values, one or two tie groups.
        let mut cases: Vec<(Vec<f64>, u64, u64, u64)> = Vec::new();
        for &n in &[5_000usize, 300_000] {
            for quantised in [true, false] {
                let v = pool_recipe(n, 3 + n as u64, quantised);
                for (lo, hi, per) in [(0u64, 64u64, 16u64), (4, 40, 20), (0, 64, 1), (1, 30, 10)] {
                    cases.push((v.clone(), per * n as u64, lo, hi));
                }
            }
            let two: Vec<f64> = (0..n)
                .map(|i| if i % 3 == 0 { 0.25 } else { 0.0625 })
                .collect();
            cases.push((two, 12 * n as u64, 0, 64));
            cases.push((vec![0.2; n], 10 * n as u64 + 7, 1, 64));
        }
        for (v, budget, lo, hi) in cases {
            let s = scan(&v, lo, hi);
            let lower = lo.max(1);
            let base = lo * (v.len() as u64 - s.positive) + lower * s.positive;
            let units = budget - base;
            if units == 0 || units >= s.positive_units || (lo == 0 && budget < s.positive) {
                continue;
            }
            let (out, work) = solve_by_threshold(&v, lo, lower, hi, units, s.positive);
            assert_greedy_optimal(&v, &out, budget, lo, hi);
            let n = v.len();
            assert!(
                work.cheap_passes <= 24,
                "{work:?} n={n} [{lo}, {hi}] budget {budget}"
            );
            assert_eq!(
                work.exact_passes, 1,
                "{work:?} n={n} [{lo}, {hi}] budget {budget}"
            );
            // At most about one unit per prompt (a group of tied gains can span every prompt).
            assert!(work.candidates <= n + 4096, "{work:?} n={n} [{lo}, {hi}]");
        }
    }

    #[test]
    fn huge_bounds_and_budgets_stay_exact() {
        let v = [0.3, 0.1, 0.5, 0.0, 1e-3];
        for (lo, hi, budget) in [
            (1u64, 2_000_000_000_000u64, 3_000_000_000_000u64),
            (0, 1 << 40, 1 << 41),
            (7, 1 << 52, (1 << 52) + 12345),
        ] {
            let got = run(&v, budget, lo, hi);
            assert_greedy_optimal(&v, &got, budget, lo, hi);
        }
    }

    #[test]
    fn closed_form_is_right_whenever_it_claims_certainty() {
        let mut rng = Rng::new(17);
        let mut sure_count = 0;
        let total = 40_000;
        for case in 0..total {
            let v = match case % 3 {
                0 => rng.unit(),
                1 => (1 + rng.below(16)) as f64 / 64.0,
                _ => rng.unit() * 1e6,
            };
            let lower = 1 + rng.below(6);
            let hi = lower + 1 + rng.below(60);
            // Thresholds at actual gains hit the boundary cases exactly.
            let lambda = if case % 2 == 0 {
                marginal_gain((1 + rng.below(16)) as f64 / 64.0, 1 + rng.below(60))
            } else {
                v / (1.0 + rng.unit() * 4000.0)
            };
            let th = Threshold::new(lambda);
            let want = (lower..hi)
                .filter(|&n| marginal_gain(v, n) > lambda)
                .count() as u64;
            assert_eq!(count_above_at(v, lower, hi, &th), want);
            let (count, sure) = closed_form_count(v, v.sqrt(), lower as f64, hi as f64, &th);
            if sure {
                assert_eq!(count as u64, want, "v={v} λ={lambda} [{lower}, {hi})");
                sure_count += 1;
            }
        }
        // The closed form must carry the bulk of the work.
        assert!(sure_count > total * 3 / 4, "{sure_count} of {total}");
    }

    #[test]
    fn count_above_agrees_with_gain_comparisons() {
        let mut rng = Rng::new(3);
        for _ in 0..20_000 {
            let v = if rng.below(2) == 0 {
                rng.unit()
            } else {
                (1 + rng.below(8)) as f64 / 8.0
            };
            let lower = 1 + rng.below(5);
            let hi = lower + rng.below(40);
            // Thresholds drawn from actual gains hit the boundary cases.
            let lambda = if rng.below(2) == 0 {
                marginal_gain((1 + rng.below(8)) as f64 / 8.0, 1 + rng.below(40))
            } else {
                rng.unit() * 0.1
            };
            let want = (lower..hi)
                .filter(|&n| marginal_gain(v, n) > lambda)
                .count() as u64;
            assert_eq!(
                count_above(v, lower, hi, lambda),
                want,
                "v={v} λ={lambda} [{lower},{hi})"
            );
        }
    }
}
