//! Estimator-aware allocation objectives (pure Rust, no PyO3). The names are OpenRLHF's
//! `--algo.advantage.estimator` values; `None` (no estimator) keeps the Σ v_i/n_i objective.
//!
//! * `rloo`, `dr_grpo`, `reinforce_baseline`: minimise Σ v_i/(n_i − 1) over 2 ≤ lo ≤ n_i ≤ hi,
//!   Σ n_i = B. With m_i = n_i − 1 this is exactly the Σ v_i/m_i problem with budget B − N and
//!   bounds lo − 1..hi − 1, so `neyman::solve` gives the exact answer (and its tie rule: gain
//!   descending, then fewer rollouts, then the lower index); see [`solve_shifted`].
//! * `group_norm` (posterior-based, `PassRatePool::allocate` only): per prompt with posterior
//!   Beta(α, β) and v = E[p(1−p)], the cost of a group of n ≥ 2 rollouts is
//!
//!   ```text
//!   c(n) = v · (n − 1) / (n² · P(n)),   P(n) = 1 − E[pⁿ] − E[(1−p)ⁿ]
//!   ```
//!
//!   (P(n): probability that the group is not all-equal; an all-equal group has zero gradient
//!   under group_norm). P is computed without cancellation from P(2) = 2v and
//!   P(n+1) − P(n) = E[pⁿ(1−p)] + E[(1−p)ⁿ p], both terms products of exact Beta moment ratios,
//!   and the marginal gain c(n) − c(n+1) from a cancellation-free closed form
//!   ([`GainRow`]). c is decreasing and convex in n (checked numerically, see
//!   docs/allocation_objectives.md), so taking the K = B − N·lo largest marginal gains is exact.
//!   [`solve_group_norm`] finds them by a threshold search on a table of gains.

use crate::error::{Error, Result};
use crate::neyman;
use crate::parallel::map_chunks_mut;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Estimator {
    Rloo,
    DrGrpo,
    ReinforceBaseline,
    GroupNorm,
}

/// What an estimator makes the allocator minimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Σ v_i/(n_i − 1): rloo, dr_grpo, reinforce_baseline.
    Shifted,
    /// Σ c_i(n_i) from the Beta posterior's moments: group_norm.
    GroupNorm,
}

impl Estimator {
    pub const NAMES: [&'static str; 4] = ["rloo", "dr_grpo", "reinforce_baseline", "group_norm"];

    /// The one place where estimator names are parsed.
    pub fn parse(name: &str) -> Result<Estimator> {
        match name {
            "rloo" => Ok(Estimator::Rloo),
            "dr_grpo" => Ok(Estimator::DrGrpo),
            "reinforce_baseline" => Ok(Estimator::ReinforceBaseline),
            "group_norm" => Ok(Estimator::GroupNorm),
            other => Err(Error::invalid(format!(
                "estimator must be None or one of 'rloo', 'dr_grpo', 'reinforce_baseline', \
                 'group_norm', got {other:?}"
            ))),
        }
    }

    pub fn parse_optional(name: Option<&str>) -> Result<Option<Estimator>> {
        name.map(Estimator::parse).transpose()
    }

    pub fn name(self) -> &'static str {
        match self {
            Estimator::Rloo => "rloo",
            Estimator::DrGrpo => "dr_grpo",
            Estimator::ReinforceBaseline => "reinforce_baseline",
            Estimator::GroupNorm => "group_norm",
        }
    }

    pub fn objective(self) -> Objective {
        match self {
            Estimator::GroupNorm => Objective::GroupNorm,
            _ => Objective::Shifted,
        }
    }

    /// Checks `lo` for the estimator: every estimator needs groups of at least 2 (a group of one
    /// has no baseline / zero advantage). With lo = 0, the Σ v/(n−1) estimators accept
    /// `min_rollouts ≥ 2` (every prompt 0 or at least min_rollouts rollouts); group_norm does not.
    /// `skip_factor` (its rule is derived for Σ v/n) is refused with every estimator.
    pub fn check(self, lo: i64, skip_factor: Option<f64>, min_rollouts: Option<i64>) -> Result<()> {
        let name = self.name();
        if skip_factor.is_some_and(|f| f > 0.0) {
            return Err(Error::invalid(format!(
                "skip_factor is not supported with estimator '{name}' (its skipping rule is \
                 derived for the Σ v/n objective); with lo = 0 use min_rollouts >= 2 instead"
            )));
        }
        if lo >= 2 {
            return Ok(());
        }
        let floor = min_rollouts.is_some_and(|m| m >= 2);
        match self.objective() {
            Objective::Shifted if lo == 0 && floor => Ok(()),
            Objective::Shifted => Err(Error::invalid(format!(
                "estimator '{name}' needs lo >= 2 (a group of one rollout has no baseline), \
                 got lo = {lo}; to let prompts be skipped use lo = 0 with min_rollouts >= 2"
            ))),
            Objective::GroupNorm => Err(Error::invalid(format!(
                "estimator 'group_norm' needs lo >= 2 (a group of one rollout has zero \
                 advantage under group_norm), got lo = {lo}"
            ))),
        }
    }
}

/// Exact minimiser of Σ v_i/(n_i − 1) with Σ n_i = budget, 1 ≤ lo ≤ n_i ≤ hi, for validated
/// input (finite non-negative v, feasible budget): Σ v/m over m = n − 1 with budget
/// `budget − N`, bounds `lo − 1..hi − 1`, then n = m + 1. With lo = 1 (used for served prompts
/// whose floor is ≥ 2 only through `lo`) the shifted lower bound is 0, i.e. today's lo = 0
/// semantics of `neyman::solve`; callers pass lo ≥ 2.
pub fn solve_shifted(v: &[f64], budget: u64, lo: u64, hi: u64) -> Vec<i64> {
    debug_assert!(lo >= 1 && lo <= hi);
    let n = v.len() as u64;
    let (b, l, h) = (budget - n, lo - 1, hi - 1);
    let scan = neyman::scan(v, l, h);
    let mut out = neyman::solve(v, b, l, h, &scan);
    for o in &mut out {
        *o += 1;
    }
    out
}

/// [`solve_shifted`] on the weights w = v·s (`scan` = `neyman::scan_scaled(v, s, lo − 1,
/// hi − 1)`), equal to `solve_shifted(&w, …)` bit for bit without storing w where the scan
/// decides the answer.
pub fn solve_shifted_scaled(
    v: &[f64],
    s: &[f64],
    budget: u64,
    lo: u64,
    hi: u64,
    scan: &neyman::Scan,
) -> Vec<i64> {
    debug_assert!(lo >= 1 && lo <= hi);
    let n = v.len() as u64;
    let mut out = neyman::solve_scaled(v, s, budget - n, lo - 1, hi - 1, scan);
    for o in &mut out {
        *o += 1;
    }
    out
}

/// The group_norm cost of one prompt, level by level: P(n), E[pⁿ], E[(1−p)ⁿ] advanced by exact
/// Beta moment ratios.
#[derive(Clone, Copy, Debug)]
pub struct GainRow {
    alpha: f64,
    beta: f64,
    /// v = E[p(1−p)] times the (calibration) scale.
    weight: f64,
    n: u64,
    /// E[pⁿ], E[(1−p)ⁿ], P(n) at the current level n.
    ep: f64,
    eq: f64,
    p: f64,
}

impl GainRow {
    /// Starts at level n = 2 (P(2) = 2·E[p(1−p)]). `scale` multiplies the cost (calibration).
    pub fn new(alpha: f64, beta: f64, scale: f64) -> GainRow {
        let s = alpha + beta;
        let v = alpha * beta / (s * (s + 1.0));
        GainRow {
            alpha,
            beta,
            weight: v * scale,
            n: 2,
            ep: alpha / s * ((alpha + 1.0) / (s + 1.0)),
            eq: beta / s * ((beta + 1.0) / (s + 1.0)),
            p: 2.0 * v,
        }
    }

    /// P(n + 1) − P(n) = E[pⁿ(1−p)] + E[(1−p)ⁿ p], and E[pⁿ⁺¹], E[(1−p)ⁿ⁺¹].
    #[inline]
    fn step(&self) -> (f64, f64, f64) {
        step_kernel(self.alpha, self.beta, self.n as f64, self.ep, self.eq)
    }

    /// Advances to level `n` (≥ the current one).
    pub fn seek(&mut self, n: u64) {
        while self.n < n {
            self.advance();
        }
    }

    #[inline]
    fn advance(&mut self) {
        let (up, ep, eq) = self.step();
        self.p += up;
        self.ep = ep;
        self.eq = eq;
        self.n += 1;
    }

    /// c(n) at the current level.
    pub fn cost(&self) -> f64 {
        let n = self.n as f64;
        self.weight * (n - 1.0) / (n * n * self.p)
    }

    /// Marginal gain c(n) − c(n+1) at the current level, then advances to n + 1. Closed form
    /// without cancellation: with d = P(n+1) − P(n),
    /// c(n) − c(n+1) = w·((n²−n−1)·P(n) + (n−1)(n+1)²·d) / (n²(n+1)²·P(n)·P(n+1)).
    #[inline]
    pub fn next_gain(&mut self) -> f64 {
        let (up, ep, eq) = self.step();
        let gain = gain_kernel(self.weight, self.n as f64, self.p, up);
        self.p += up;
        self.ep = ep;
        self.eq = eq;
        self.n += 1;
        gain
    }
}

/// One level of the Beta moment recurrences (one division): with d = α + β + n,
/// E[pⁿ(1−p)] = E[pⁿ]·β/d, E[(1−p)ⁿp] = E[(1−p)ⁿ]·α/d, E[pⁿ⁺¹] = E[pⁿ]·(α+n)/d, and the same
/// for 1 − p. Returns (P(n+1) − P(n), E[pⁿ⁺¹], E[(1−p)ⁿ⁺¹]). Shared by the scalar rows and the
/// vectorised table fill, so both compute bit-identical values.
#[inline(always)]
fn step_kernel(alpha: f64, beta: f64, n: f64, ep: f64, eq: f64) -> (f64, f64, f64) {
    let inv = 1.0 / (alpha + beta + n);
    let up = (ep * beta + eq * alpha) * inv;
    (up, ep * ((alpha + n) * inv), eq * ((beta + n) * inv))
}

/// c(n) − c(n+1) for weight w, P(n) = p, P(n+1) = p + up, without cancellation:
/// w·((n²−n−1)·P(n) + (n−1)(n+1)²·up) / (n²(n+1)²·P(n)·P(n+1)), evaluated as
/// (w/P(n)) · (num / (P(n+1)·n²(n+1)²)) so that nothing underflows (w/P(n) ≤ scale/2).
#[inline(always)]
fn gain_kernel(w: f64, n: f64, p: f64, up: f64) -> f64 {
    let p1 = p + up;
    let m = n + 1.0;
    let num = (n * n - n - 1.0) * p + ((n - 1.0) * (m * m)) * up;
    (w / p) * (num / (p1 * ((n * n) * (m * m))))
}

/// The group_norm cost c(n) of one prompt (n ≥ 2), for tests and reports.
pub fn group_norm_cost(alpha: f64, beta: f64, scale: f64, n: u64) -> f64 {
    let mut row = GainRow::new(alpha, beta, scale);
    row.seek(n);
    row.cost()
}

/// Each prompt's group_norm cost at its count: `weights[i] · (n−1)/(n²·P(n))` under Beta(α_i, β_i)
/// (`weights` = the posterior E[p(1−p)] gives [`group_norm_cost`] with scale 1; a calibrated variance
/// gives the calibrated cost); 0 for n < 2 (a group of 0 or 1 has no group_norm gradient — callers
/// charge what they choose). The one implementation the trainer's predicted ratio uses.
pub fn group_norm_costs(
    alpha: &[f64],
    beta: &[f64],
    weights: &[f64],
    counts: &[i64],
) -> Result<Vec<f64>> {
    let n = alpha.len();
    if beta.len() != n || weights.len() != n || counts.len() != n {
        return Err(Error::invalid(format!(
            "alpha, beta, weights and counts must have the same length, got {}, {}, {}, {}",
            n,
            beta.len(),
            weights.len(),
            counts.len()
        )));
    }
    for (name, xs) in [("alpha", alpha), ("beta", beta)] {
        if let Some((i, x)) = xs
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x > 0.0))
        {
            return Err(Error::invalid(format!(
                "{name}[{i}] must be a finite number > 0, got {x}"
            )));
        }
    }
    if let Some((i, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
    {
        return Err(Error::invalid(format!(
            "weights[{i}] must be a finite number >= 0, got {w}"
        )));
    }
    Ok((0..n)
        .map(|i| {
            if counts[i] < 2 {
                return 0.0;
            }
            let (a, b) = (alpha[i], beta[i]);
            let v = a * b / ((a + b) * (a + b + 1.0));
            group_norm_cost(a, b, weights[i] / v, counts[i] as u64)
        })
        .collect())
}

/// Largest number of marginal gains N·(min(hi, lo + K) − lo) `solve_group_norm` evaluates per
/// pass (a few passes of about a nanosecond each per gain).
pub const MAX_GROUP_NORM_UNITS: u64 = 1 << 32;

/// Levels a prompt can actually use: at most lo + K rollouts, K = budget − N·lo.
fn effective_hi(n: usize, budget: u64, lo: u64, hi: u64) -> u64 {
    hi.min(lo + (budget - n as u64 * lo))
}

/// Checks the posterior parameters and the work bound for `solve_group_norm` (budget feasible).
pub fn check_group_norm(
    alpha: &[f64],
    beta: &[f64],
    scale: Option<&[f64]>,
    budget: u64,
    lo: u64,
    hi: u64,
) -> Result<()> {
    let width = effective_hi(alpha.len(), budget, lo, hi) - lo;
    if alpha.len() as u128 * width as u128 > MAX_GROUP_NORM_UNITS as u128 {
        return Err(Error::invalid(format!(
            "estimator 'group_norm' supports N*(min(hi, lo + budget - N*lo) - lo) <= \
             {MAX_GROUP_NORM_UNITS} marginal gains, got N = {}, lo = {lo}, hi = {hi}, \
             budget = {budget}",
            alpha.len()
        )));
    }
    for (name, xs) in [("alpha", alpha), ("beta", beta)] {
        if let Some(i) = xs.iter().position(|&x| !(x > 0.0 && x.is_finite())) {
            return Err(Error::invalid(format!(
                "posterior {name}[{i}] must be a finite positive number, got {}",
                xs[i]
            )));
        }
    }
    if let Some(s) = scale {
        if let Some(i) = s.iter().position(|&x| !(x >= 0.0 && x.is_finite())) {
            return Err(Error::invalid(format!(
                "calibration scale[{i}] must be finite and non-negative, got {}",
                s[i]
            )));
        }
    }
    Ok(())
}

/// Number of entries of a non-increasing row that are > λ (or ≥ λ when `inclusive`).
#[inline]
fn row_count(row: &[f64], lambda: f64, inclusive: bool) -> usize {
    if inclusive {
        row.partition_point(|&g| g >= lambda)
    } else {
        row.partition_point(|&g| g > lambda)
    }
}

/// The marginal gains of the prompts, computed block by block on the fly (never stored whole).
struct Gains<'a> {
    alpha: &'a [f64],
    beta: &'a [f64],
    scale: Option<&'a [f64]>,
    lo: u64,
    width: usize,
}

impl Gains<'_> {
    /// Prompts per block: the block's rows (row-major, `width` each) stay within ~256 KiB.
    fn block_len(&self) -> usize {
        (32_768 / self.width).clamp(1, BLOCK)
    }

    /// Calls `f(first_index, rows)` for consecutive blocks of prompts `start..start + len`;
    /// `rows` holds each prompt's gains at levels lo..lo + width, non-increasing.
    fn for_blocks(&self, start: usize, len: usize, mut f: impl FnMut(usize, &[f64])) {
        let step = self.block_len();
        let mut buf = vec![0.0f64; step * self.width];
        let ones = [1.0f64; BLOCK];
        let mut i = start;
        while i < start + len {
            let k = step.min(start + len - i);
            let s = self.scale.map_or(&ones[..k], |s| &s[i..i + k]);
            let rows = &mut buf[..k * self.width];
            fill_block(
                &self.alpha[i..i + k],
                &self.beta[i..i + k],
                s,
                self.lo,
                self.width,
                rows,
            );
            f(i, rows);
            i += k;
        }
    }
}

/// Exact minimiser of Σ scale_i·c_i(n_i) (group_norm cost of Beta(alpha_i, beta_i)) with
/// Σ n_i = budget, 2 ≤ lo ≤ n_i ≤ hi, for input checked by `check_group_norm` and a feasible
/// budget. The result is the greedy's: every prompt at lo plus the K = budget − N·lo largest
/// units (prompt i, level n) under the order "gain descending, then the lower level, then the
/// lower index" (as `neyman`); gains are each row's float64 gains made non-increasing by a
/// running minimum (the exact gains are non-increasing; the float ones can differ only by
/// rounding). Steps:
///
/// 1. λ*, the gain of the K-th unit: a fixed-stride sample of rows gives a window [L, H) of
///    gains, verified by exact counts (#≥H < K ≤ #≥L; widened until it holds). If #>L < K then
///    λ* = L, else λ* is the (K − #≥H)-th largest of the gains strictly between L and H.
/// 2. Every unit above λ* is taken; the K − #>λ* missing units are ties at λ*, taken level by
///    level (lower first) and within a level by index, from a histogram of the tie levels.
///
/// Gains are recomputed in each pass (vectorised blocks), so memory stays O(N).
pub fn solve_group_norm(
    alpha: &[f64],
    beta: &[f64],
    scale: Option<&[f64]>,
    budget: u64,
    lo: u64,
    hi: u64,
) -> Vec<i64> {
    debug_assert!(lo >= 2 && lo <= hi && alpha.len() == beta.len());
    let n = alpha.len();
    let hi = effective_hi(n, budget, lo, hi);
    let width = (hi - lo) as usize;
    let units = budget - n as u64 * lo;
    if units == 0 || width == 0 {
        return vec![lo as i64; n];
    }
    let total = n as u64 * width as u64;
    if units == total {
        return vec![hi as i64; n];
    }
    let gains = Gains {
        alpha,
        beta,
        scale,
        lo,
        width,
    };
    // 1. The sample: whole rows of prompts at a fixed stride, sorted descending.
    const SAMPLE: usize = 1 << 15;
    let rows = (SAMPLE / width).clamp(1, n);
    let picks: Vec<usize> = (0..rows)
        .map(|t| (t as u128 * n as u128 / rows as u128) as usize)
        .collect();
    let pick = |xs: &[f64]| -> Vec<f64> { picks.iter().map(|&i| xs[i]).collect() };
    let (sa, sb, ss) = (pick(alpha), pick(beta), scale.map(pick));
    let picked = Gains {
        alpha: &sa,
        beta: &sb,
        scale: ss.as_deref(),
        lo,
        width,
    };
    let mut sample = Vec::with_capacity(rows * width);
    picked.for_blocks(0, rows, |_, block| sample.extend_from_slice(block));
    // A sample of the whole table gives λ* (the K-th largest gain) directly.
    let exact = (rows == n).then(|| {
        let k = (units - 1) as usize;
        sample.select_nth_unstable_by(k, |a, b| b.total_cmp(a));
        sample[k]
    });
    if exact.is_none() {
        sample.sort_unstable_by(|a, b| b.total_cmp(a));
    }
    let s = sample.len() as f64;
    let q = units as f64 / total as f64;
    let mut margin = 4.0 * (s * q * (1.0 - q)).sqrt() + 8.0;
    let at = |k: f64| -> f64 {
        if k < 0.0 {
            f64::INFINITY
        } else if k >= s {
            f64::NEG_INFINITY
        } else {
            sample[k as usize]
        }
    };
    // One pass per window: per prompt (#≥H, #>L, #≥L) and its gains strictly between L and H
    // (contiguous in its row), kept so that the counts at λ* need no second pass.
    let mut counts = vec![(0u32, 0u32, 0u32); n];
    let (lambda, low, parts) = loop {
        let (high, low) = match exact {
            Some(lambda) => (f64::INFINITY, lambda),
            None => (at((q * s - margin).floor()), at((q * s + margin).ceil())),
        };
        let parts: Vec<(u64, u64, u64, Vec<f64>)> =
            map_chunks_mut(alpha, &mut counts, |offset, chunk, cs| {
                let (mut ge_high, mut gt_low, mut ge_low) = (0u64, 0u64, 0u64);
                let mut between = Vec::new();
                gains.for_blocks(offset, chunk.len(), |i0, block| {
                    for (j, r) in block.chunks_exact(width).enumerate() {
                        let a = row_count(r, high, true);
                        let b = row_count(r, low, false).max(a);
                        let c = row_count(r, low, true).max(a);
                        ge_high += a as u64;
                        gt_low += b as u64;
                        ge_low += c as u64;
                        between.extend_from_slice(&r[a..b]);
                        cs[i0 - offset + j] = (a as u32, b as u32, c as u32);
                    }
                });
                (ge_high, gt_low, ge_low, between)
            });
        let (mut ge_high, mut gt_low, mut ge_low) = (0u64, 0u64, 0u64);
        for (a, b, c, _) in &parts {
            (ge_high, gt_low, ge_low) = (ge_high + a, gt_low + b, ge_low + c);
        }
        if !(ge_high < units && units <= ge_low) {
            margin *= 8.0;
            continue;
        }
        if gt_low < units {
            break (low, low, parts);
        }
        let mut between: Vec<f64> = parts.iter().flat_map(|p| p.3.iter().copied()).collect();
        let k = (units - ge_high - 1) as usize;
        debug_assert!(k < between.len());
        between.select_nth_unstable_by(k, |a, b| b.total_cmp(a));
        break (between[k], low, parts);
    };
    // 2. Units above λ* are taken; ties at λ* occupy levels [above, at_or_above) per prompt.
    // λ* lies in [L, H): the counts at λ* come from the stored counts and gains between.
    let mut out = vec![lo as i64; n];
    let mut ties = vec![(0u32, 0u32); n];
    let hist: Vec<(u64, Vec<i64>)> = map_chunks_mut(&counts, &mut ties, |offset, cs, ts| {
        let between = &parts[offset / crate::parallel::CHUNK_LEN].3;
        let mut at = 0usize;
        let mut taken = 0u64;
        let mut diff = vec![0i64; width + 1];
        for (&(a, b, c), t) in cs.iter().zip(ts.iter_mut()) {
            let (a, b, c) = (a as usize, b as usize, c as usize);
            let r = &between[at..at + (b - a)];
            at += b - a;
            // Entries before a are ≥ H > λ*; r holds those in (L, H); [b, c) equal L ≤ λ*.
            let gt = a + row_count(r, lambda, false);
            let ge = a + row_count(r, lambda, true) + if lambda == low { c - b } else { 0 };
            taken += gt as u64;
            diff[gt] += 1;
            diff[ge] -= 1;
            *t = (gt as u32, ge as u32);
        }
        (taken, diff)
    });
    let taken: u64 = hist.iter().map(|h| h.0).sum();
    let mut missing = units - taken;
    // Tie units per level, and per chunk at each level (for the index order within a level).
    let mut per_level = vec![0u64; width];
    let chunk_levels: Vec<Vec<u64>> = hist
        .iter()
        .map(|(_, diff)| {
            let mut run = 0i64;
            (0..width)
                .map(|l| {
                    run += diff[l];
                    per_level[l] += run as u64;
                    run as u64
                })
                .collect()
        })
        .collect();
    let mut level = 0usize;
    while level < width && per_level[level] <= missing {
        missing -= per_level[level];
        level += 1;
    }
    // Prompts take their tie levels below `level`, and the first `missing` prompts (index
    // order) with a tie at `level` take that one too.
    let mut firsts = Vec::with_capacity(chunk_levels.len());
    let mut before = 0u64;
    for c in &chunk_levels {
        firsts.push(before);
        before += c.get(level).copied().unwrap_or(0);
    }
    map_chunks_mut(&ties, &mut out, |offset, ts, os| {
        // `map_chunks_mut` numbers its chunks offset / CHUNK_LEN (as the pass above did).
        let mut rank = firsts[offset / crate::parallel::CHUNK_LEN];
        for (&(a, b), o) in ts.iter().zip(os.iter_mut()) {
            let (a, b) = (a as usize, b as usize);
            let mut take = a + b.min(level).saturating_sub(a);
            if a <= level && level < b {
                if rank < missing {
                    take += 1;
                }
                rank += 1;
            }
            *o += take as i64;
        }
    });
    out
}

/// Prompts per vectorised block.
const BLOCK: usize = 64;

/// The gain rows of up to `BLOCK` prompts (row-major into `rows`, `width` per prompt), level by
/// level across the prompts so that the inner loops vectorise; the same operations as
/// [`GainRow`] with the running minimum, hence the same values.
fn fill_block(a: &[f64], b: &[f64], s: &[f64], lo: u64, width: usize, rows: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(a: &[f64], b: &[f64], s: &[f64], lo: u64, width: usize, rows: &mut [f64]) {
            fill_block_generic(a, b, s, lo, width, rows)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { avx2(a, b, s, lo, width, rows) };
        }
    }
    fill_block_generic(a, b, s, lo, width, rows)
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over fixed blocks vectorise
fn fill_block_generic(a: &[f64], b: &[f64], s: &[f64], lo: u64, width: usize, rows: &mut [f64]) {
    let len = a.len();
    debug_assert!(len <= BLOCK && rows.len() == len * width);
    let (mut ep, mut eq, mut p, mut w) = ([0.0; BLOCK], [0.0; BLOCK], [0.0; BLOCK], [0.0; BLOCK]);
    let mut last = [f64::INFINITY; BLOCK];
    for k in 0..len {
        let row = GainRow::new(a[k], b[k], s[k]);
        (ep[k], eq[k], p[k], w[k]) = (row.ep, row.eq, row.p, row.weight);
    }
    for n in 2..lo {
        let n = n as f64;
        for k in 0..len {
            let (up, e1, e2) = step_kernel(a[k], b[k], n, ep[k], eq[k]);
            p[k] += up;
            (ep[k], eq[k]) = (e1, e2);
        }
    }
    for j in 0..width {
        let n = (lo + j as u64) as f64;
        for k in 0..len {
            let (up, e1, e2) = step_kernel(a[k], b[k], n, ep[k], eq[k]);
            let gain = gain_kernel(w[k], n, p[k], up);
            p[k] += up;
            (ep[k], eq[k]) = (e1, e2);
            last[k] = if gain < last[k] { gain } else { last[k] };
        }
        for k in 0..len {
            rows[k * width + j] = last[k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neyman::tests::Rng;

    /// One unit: raising `index` from `level` to `level + 1` has gain `gain`.
    #[derive(Clone, Copy, Debug)]
    struct Unit {
        gain: f64,
        level: u64,
        index: usize,
    }

    /// Greedy order: larger gain first, then the lower level, then the lower index.
    fn unit_order(a: &Unit, b: &Unit) -> std::cmp::Ordering {
        b.gain
            .total_cmp(&a.gain)
            .then(a.level.cmp(&b.level))
            .then(a.index.cmp(&b.index))
    }

    /// Brute-force DP over Σ cost_i(n_i), n_i ∈ [lo, hi], Σ n_i = budget; returns the minimum.
    fn dp_min(costs: &[Vec<f64>], budget: u64, lo: u64, hi: u64) -> f64 {
        let b = budget as usize;
        let mut best = vec![f64::INFINITY; b + 1];
        best[0] = 0.0;
        for c in costs {
            let mut next = vec![f64::INFINITY; b + 1];
            for (used, &so_far) in best.iter().enumerate() {
                if so_far.is_infinite() {
                    continue;
                }
                for k in lo..=hi {
                    let t = used + k as usize;
                    if t > b {
                        break;
                    }
                    let val = so_far + c[k as usize];
                    if val < next[t] {
                        next[t] = val;
                    }
                }
            }
            best = next;
        }
        best[b]
    }

    fn random_v(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| match rng.below(5) {
                0 => 0.0,
                1 => 0.25,
                _ => rng.unit() * 0.25,
            })
            .collect()
    }

    #[test]
    fn names_parse_in_one_place() {
        for name in Estimator::NAMES {
            assert_eq!(Estimator::parse(name).unwrap().name(), name);
        }
        assert_eq!(Estimator::parse_optional(None).unwrap(), None);
        assert_eq!(
            Estimator::parse("grpo").unwrap_err().to_string(),
            "estimator must be None or one of 'rloo', 'dr_grpo', 'reinforce_baseline', \
             'group_norm', got \"grpo\""
        );
    }

    #[test]
    fn lo_below_two_is_refused_or_needs_the_floor() {
        let e = |est: Estimator, lo, f, m| est.check(lo, f, m).unwrap_err().to_string();
        assert_eq!(
            e(Estimator::Rloo, 1, None, None),
            "estimator 'rloo' needs lo >= 2 (a group of one rollout has no baseline), got lo = 1; \
             to let prompts be skipped use lo = 0 with min_rollouts >= 2"
        );
        assert!(e(Estimator::DrGrpo, 0, None, Some(1)).contains("'dr_grpo' needs lo >= 2"));
        assert!(Estimator::Rloo.check(0, None, Some(2)).is_ok());
        assert!(Estimator::Rloo.check(0, Some(0.0), Some(3)).is_ok());
        assert!(
            e(Estimator::Rloo, 0, Some(4.0), Some(2)).starts_with("skip_factor is not supported")
        );
        assert!(e(Estimator::GroupNorm, 0, None, Some(2)).contains("'group_norm' needs lo >= 2"));
        assert!(Estimator::GroupNorm.check(2, None, None).is_ok());
    }

    #[test]
    fn shifted_is_exact_against_brute_force() {
        let mut rng = Rng::new(11);
        for case in 0..3000 {
            let n = 1 + rng.below(6) as usize;
            let lo = 2 + rng.below(3);
            let hi = lo + rng.below(7);
            let (min, max) = (n as u64 * lo, n as u64 * hi);
            // Budgets at both extremes often.
            let budget = match case % 4 {
                0 => min,
                1 => max,
                _ => min + rng.below(max - min + 1),
            };
            let v = random_v(&mut rng, n);
            let out = solve_shifted(&v, budget, lo, hi);
            assert_eq!(out.iter().sum::<i64>() as u64, budget);
            assert!(out.iter().all(|&c| c as u64 >= lo && c as u64 <= hi));
            let costs: Vec<Vec<f64>> = v
                .iter()
                .map(|&x| {
                    (0..=hi)
                        .map(|k| {
                            if k < 2 {
                                f64::INFINITY
                            } else {
                                x / (k - 1) as f64
                            }
                        })
                        .collect()
                })
                .collect();
            let got: f64 = out.iter().zip(&v).map(|(&c, &x)| x / (c - 1) as f64).sum();
            let best = dp_min(&costs, budget, lo, hi);
            assert!(
                (got - best).abs() <= 1e-12 * best.max(1e-300),
                "{v:?} {budget} {lo} {hi}: {out:?}"
            );
        }
        // Ties: equal variances, the extra rollouts go to the lower indices; v = 0 stays at lo.
        assert_eq!(solve_shifted(&[0.2, 0.2, 0.2], 8, 2, 4), vec![3, 3, 2]);
        assert_eq!(solve_shifted(&[0.0, 0.2, 0.0], 8, 2, 4), vec![2, 4, 2]);
        // Shifted vs plain: 0.2/(n−1) + 0.05/(m−1) with n + m = 8 → n − 1 = 2·(m − 1) → 5, 3;
        // plain Σ v/n gives 5.33/2.67 → 5, 3 too, but with budget 6: shifted 4, 2 vs plain 4, 2;
        // budget 11: shifted 7, 4 (m−1 = 3, n−1 = 6), plain 7, 4.
        assert_eq!(solve_shifted(&[0.2, 0.05], 8, 2, 16), vec![5, 3]);
        assert_eq!(solve_shifted(&[0.2, 0.05], 11, 2, 16), vec![7, 4]);
    }

    fn dense_cost(a: f64, b: f64, s: f64, hi: u64) -> Vec<f64> {
        (0..=hi)
            .map(|k| {
                if k < 2 {
                    f64::INFINITY
                } else {
                    group_norm_cost(a, b, s, k)
                }
            })
            .collect()
    }

    #[test]
    fn group_norm_gains_match_cost_differences_and_are_non_increasing() {
        let mut rng = Rng::new(3);
        for _ in 0..300 {
            let a = 10f64.powf(rng.unit() * 7.0 - 3.0);
            let b = 10f64.powf(rng.unit() * 7.0 - 3.0);
            let mut row = GainRow::new(a, b, 1.0);
            let mut prev = f64::INFINITY;
            for n in 2..200u64 {
                let diff = group_norm_cost(a, b, 1.0, n) - group_norm_cost(a, b, 1.0, n + 1);
                let g = row.next_gain();
                assert!(g > 0.0, "{a} {b} {n}");
                assert!(
                    (g - diff).abs()
                        <= 1e-9 * g.max(diff.abs()) + 1e-15 * group_norm_cost(a, b, 1.0, n),
                    "{a} {b} {n}: {g} vs {diff}"
                );
                assert!(g <= prev * (1.0 + 1e-12), "not convex at {a} {b} {n}");
                prev = g;
            }
        }
        // P(2) = 2v makes c(2) = 1/8 for every posterior.
        assert!((group_norm_cost(0.3, 7.0, 1.0, 2) - 0.125).abs() < 1e-15);
        assert!((group_norm_cost(3.0, 7.0, 2.0, 2) - 0.25).abs() < 1e-15);
        // Large n: P → 1, c(n) ≈ v (n−1)/n².
        let (a, b) = (30.0, 30.0);
        let v = a * b / ((a + b) * (a + b + 1.0));
        let c = group_norm_cost(a, b, 1.0, 400);
        assert!((c / (v * 399.0 / 160_000.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn group_norm_costs_per_prompt() {
        let (a, b) = ([0.5, 3.0, 40.0], [2.0, 3.0, 1.5]);
        let v: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x * y / ((x + y) * (x + y + 1.0)))
            .collect();
        let w = [v[0], 2.0 * v[1], 0.0];
        let got = group_norm_costs(&a, &b, &w, &[7, 2, 5]).unwrap();
        assert!((got[0] / group_norm_cost(a[0], b[0], 1.0, 7) - 1.0).abs() < 1e-12);
        assert!((got[1] / group_norm_cost(a[1], b[1], 2.0, 2) - 1.0).abs() < 1e-12);
        assert_eq!(got[2], 0.0);
        assert_eq!(
            group_norm_costs(&a, &b, &w, &[1, 0, 1]).unwrap(),
            vec![0.0; 3]
        );
        assert!(group_norm_costs(&a, &b, &w, &[2, 2]).is_err());
        assert!(group_norm_costs(&[0.0], &[1.0], &[0.1], &[2]).is_err());
        assert!(group_norm_costs(&[1.0], &[1.0], &[f64::NAN], &[2]).is_err());
    }

    #[test]
    fn group_norm_is_exact_against_brute_force() {
        let mut rng = Rng::new(17);
        for case in 0..3000 {
            let n = 1 + rng.below(6) as usize;
            let lo = 2 + rng.below(3);
            let hi = lo + rng.below(9);
            let (min, max) = (n as u64 * lo, n as u64 * hi);
            let budget = match case % 4 {
                0 => min,
                1 => max,
                _ => min + rng.below(max - min + 1),
            };
            let draw = |rng: &mut Rng| match rng.below(4) {
                0 => 1.0,
                _ => 10f64.powf(rng.unit() * 5.0 - 2.0),
            };
            let alpha: Vec<f64> = (0..n).map(|_| draw(&mut rng)).collect();
            let beta: Vec<f64> = (0..n).map(|_| draw(&mut rng)).collect();
            let scale: Option<Vec<f64>> =
                (case % 3 == 0).then(|| (0..n).map(|_| 0.5 + rng.unit()).collect());
            let s = |i: usize| scale.as_ref().map_or(1.0, |s| s[i]);
            let out = solve_group_norm(&alpha, &beta, scale.as_deref(), budget, lo, hi);
            assert_eq!(out.iter().sum::<i64>() as u64, budget);
            assert!(out.iter().all(|&c| c as u64 >= lo && c as u64 <= hi));
            let costs: Vec<Vec<f64>> = (0..n)
                .map(|i| dense_cost(alpha[i], beta[i], s(i), hi))
                .collect();
            let got: f64 = out
                .iter()
                .enumerate()
                .map(|(i, &c)| costs[i][c as usize])
                .sum();
            let best = dp_min(&costs, budget, lo, hi);
            assert!(
                (got - best).abs() <= 1e-12 * best,
                "{alpha:?} {beta:?} {budget} {lo} {hi}: {out:?}"
            );
        }
        // Identical posteriors tie: extra rollouts to the lower indices, one level at a time.
        let same = [2.0; 3];
        assert_eq!(solve_group_norm(&same, &same, None, 8, 2, 5), vec![3, 3, 2]);
    }

    #[test]
    fn group_norm_large_inputs_match_a_plain_greedy() {
        // Above the parallel threshold and with many ties, the threshold search must equal the
        // greedy on the same gains (ties: level, then index).
        let mut rng = Rng::new(29);
        let n = 70_000;
        let varied: Vec<f64> = (0..2 * n).map(|_| 1.0 + rng.below(20) as f64).collect();
        let same = vec![3.0; 2 * n];
        let continuous: Vec<f64> = (0..2 * n).map(|_| 0.1 + 30.0 * rng.unit()).collect();
        let (lo, hi) = (2u64, 9u64);
        let cases = [&varied, &same, &continuous];
        for (budget, ab) in [n as u64 * lo + 1, n as u64 * 5 + 12_345, n as u64 * hi - 1]
            .into_iter()
            .flat_map(|b| cases.iter().map(move |ab| (b, ab)))
        {
            let (alpha, beta) = ab.split_at(n);
            let out = solve_group_norm(alpha, beta, None, budget, lo, hi);
            let mut units = Vec::new();
            for i in 0..n {
                let mut row = GainRow::new(alpha[i], beta[i], 1.0);
                row.seek(lo);
                let mut last = f64::INFINITY;
                for level in lo..hi {
                    last = last.min(row.next_gain());
                    units.push(Unit {
                        gain: last,
                        level,
                        index: i,
                    });
                }
            }
            units.sort_unstable_by(unit_order);
            let mut want = vec![lo as i64; n];
            for u in &units[..(budget - n as u64 * lo) as usize] {
                want[u.index] += 1;
            }
            assert_eq!(out, want);
        }
    }
}
