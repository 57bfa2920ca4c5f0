//! Beta pass-rate posteriors for a pool of prompts keyed by int64 id, with per-prompt gradient
//! noise statistics.
//!
//! Each prompt has a Beta(α0 + s, β0 + f) posterior where (s, f) is the (forgotten) evidence above
//! the prior. Evidence, not α/β, is stored, so the prior can be changed or fitted later.
//!
//! Noise statistics (generic in a per-rollout proxy q ≥ 0 of the squared score norm): per prompt
//! and outcome class (success, failure) a forgotten sum of q. The class's count is the class's
//! evidence (s or f): every rollout recorded after the class's first noise observation carries a
//! q, observed or imputed (see [`PassRatePool::update_with_noise`]). Pool-level class sums and
//! counts are kept incrementally; `noise_scale` shrinks each prompt's class means toward them.
//!
//! Forgetting: every `update` call is one training step. It multiplies all stored evidence (and
//! the noise sums) by ρ, then adds the step's counts. To make that O(batch), the table stores
//! values divided by a global scale g (actual = stored · g): a step does g ← g·ρ and adds k/g.
//! When g falls below `SCALE_FLOOR`, one O(pool) pass folds g into the entries and resets it to 1.
//!
//! Memory: open addressing with linear probing over one array of 24-byte slots (id i64,
//! successes f32, failures f32, noise sums 2 × f32), load factor kept in [0.67, 0.8] by growing
//! 1.1875× at a time, i.e. 30–36 bytes per prompt. `i64::MIN` marks an empty slot; the prompt whose
//! id is `i64::MIN` is kept beside the table.

use crate::allocate::{self, Options, Rule};
use crate::calibration::{self, Calibration, Observation};
use crate::error::{Error, Result};
use crate::estimator::{self, Estimator, Objective};
use crate::parallel::map_chunks;

/// Below this global scale the stored evidence is renormalised (keeps f32 entries finite).
pub const SCALE_FLOOR: f64 = 1e-18;
/// Largest fraction of occupied slots before the table grows (by 3/16: the load then stays at
/// or above 0.8/1.1875 ≈ 0.674, so that a 24-byte slot costs at most 35.7 bytes per prompt).
const MAX_LOAD: f64 = 0.8;
const MIN_SLOTS: usize = 16;
const EMPTY: i64 = i64::MIN;
/// Largest noise sum one row may add (the sums are float32; this keeps them finite).
pub const MAX_NOISE: f64 = 1e30;
/// Default shrinkage weight w0 of the noise scale (pseudo-rollouts at the pool-level mean).
pub const DEFAULT_NOISE_WEIGHT: f64 = 1.0;

/// One table slot; every value is stored as actual / scale.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Slot {
    pub id: i64,
    pub successes: f32,
    pub failures: f32,
    /// Forgotten sums of the noise proxy q over the prompt's successful / failed rollouts.
    pub noise_success: f32,
    pub noise_failure: f32,
}

const EMPTY_SLOT: Slot = Slot {
    id: EMPTY,
    successes: 0.0,
    failures: 0.0,
    noise_success: 0.0,
    noise_failure: 0.0,
};

impl Slot {
    /// A slot holding only pass-rate evidence (no noise sums), e.g. from a version-2 file.
    pub fn evidence(id: i64, successes: f32, failures: f32) -> Slot {
        Slot {
            id,
            successes,
            failures,
            ..EMPTY_SLOT
        }
    }
}

#[inline]
fn mix(id: i64) -> u64 {
    // splitmix64 finaliser: sequential row indices spread over the whole table.
    let mut z = (id as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn prefetch<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

#[derive(Clone, Debug)]
struct Table {
    slots: Vec<Slot>,
    occupied: usize,
    /// The entry of the prompt whose id equals the empty marker.
    min_id: Option<Slot>,
}

impl Table {
    fn with_prompts(prompts: usize) -> Table {
        let slots = ((prompts as f64 / MAX_LOAD).ceil() as usize + 1).max(MIN_SLOTS);
        Table {
            slots: vec![EMPTY_SLOT; slots],
            occupied: 0,
            min_id: None,
        }
    }

    fn len(&self) -> usize {
        self.occupied + self.min_id.is_some() as usize
    }

    #[inline]
    fn home(&self, id: i64) -> usize {
        // Multiply-shift range reduction: any table size, no modulo.
        ((mix(id) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, slot: usize) -> usize {
        if slot + 1 == self.slots.len() {
            0
        } else {
            slot + 1
        }
    }

    /// Slot holding `id`, or the empty slot where it would go. `id` must not be `EMPTY`.
    #[inline]
    fn probe(&self, id: i64) -> (usize, bool) {
        let mut s = self.home(id);
        loop {
            let found = self.slots[s].id;
            if found == id {
                return (s, true);
            }
            if found == EMPTY {
                return (s, false);
            }
            s = self.next(s);
        }
    }

    fn get(&self, id: i64) -> Option<Slot> {
        if id == EMPTY {
            return self.min_id;
        }
        match self.probe(id) {
            (s, true) => Some(self.slots[s]),
            _ => None,
        }
    }

    /// Makes room for `additional` new prompts without growing during the next inserts.
    fn reserve(&mut self, additional: usize) {
        let needed = self.occupied + additional;
        if needed as f64 > MAX_LOAD * self.slots.len() as f64 {
            // 1 + 3/16 < 1.2: the load after growing stays above 2/3 with room for overheads.
            let by_fifth = self.slots.len() + self.slots.len() * 3 / 16;
            let by_need = (needed as f64 / MAX_LOAD).ceil() as usize + 1;
            self.rehash(by_fifth.max(by_need));
        }
    }

    fn rehash(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY_SLOT; slots]);
        for slot in old.into_iter().filter(|s| s.id != EMPTY) {
            let (s, _) = self.probe(slot.id);
            self.slots[s] = slot;
        }
    }

    /// The entry of `id`, inserted empty if absent (growing the table first if it is full).
    #[inline]
    fn entry(&mut self, id: i64) -> &mut Slot {
        if id == EMPTY {
            return self.min_id.get_or_insert(EMPTY_SLOT);
        }
        let (mut s, found) = self.probe(id);
        if !found {
            if (self.occupied + 1) as f64 > MAX_LOAD * self.slots.len() as f64 {
                self.reserve(1);
                s = self.probe(id).0;
            }
            self.slots[s].id = id;
            self.occupied += 1;
        }
        &mut self.slots[s]
    }

    /// Inserts an entry unless its id is present (then returns false).
    fn insert_new(&mut self, slot: Slot) -> bool {
        if slot.id == EMPTY {
            let fresh = self.min_id.is_none();
            if fresh {
                self.min_id = Some(slot);
            }
            return fresh;
        }
        self.reserve(1);
        let (s, found) = self.probe(slot.id);
        if !found {
            self.slots[s] = slot;
            self.occupied += 1;
        }
        !found
    }

    fn prefetch_home(&self, id: i64) {
        prefetch(self.slots.as_ptr().wrapping_add(self.home(id)));
    }

    /// Every stored entry (table order, then the `i64::MIN` prompt).
    fn entries(&self) -> impl Iterator<Item = Slot> + '_ {
        self.slots
            .iter()
            .copied()
            .filter(|s| s.id != EMPTY)
            .chain(self.min_id)
    }

    /// Every stored entry in table order, rotated to start just after an empty slot, then the
    /// marker id's. Inserting them in this order into an empty table of the same size re-creates
    /// this layout slot for slot: linear probing places each entry after the entries before it in
    /// its cluster, and no cluster is split (plain table order would split the one that wraps past
    /// the last slot). A saved and reloaded pool therefore writes the same bytes and iterates, sums
    /// and grows exactly as the original.
    fn entries_from_gap(&self) -> impl Iterator<Item = Slot> + '_ {
        let start = self
            .slots
            .iter()
            .position(|s| s.id == EMPTY)
            .map_or(0, |i| i + 1);
        let (head, tail) = self.slots.split_at(start);
        tail.iter()
            .chain(head)
            .copied()
            .filter(|s| s.id != EMPTY)
            .chain(self.min_id)
    }

    /// Every stored entry, mutably (same order as `entries`).
    fn entries_mut(&mut self) -> impl Iterator<Item = &mut Slot> + '_ {
        self.slots
            .iter_mut()
            .filter(|s| s.id != EMPTY)
            .chain(self.min_id.iter_mut())
    }

    fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + std::mem::size_of::<Table>()
    }
}

/// Exact sum of non-negative finite f32 values, as a fixed-point integer in units of 2^-149 (the
/// smallest f32 subnormal): every such value is an integer there below 2^277, so 6 × 64 bits hold
/// the sum of up to 2^64 of them with no rounding at all. The pool keeps its evidence totals in
/// these, so that `stats()` is O(1) and its totals are independent of the order of additions
/// and removals: a reloaded pool reports the same totals as the pool that was saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExactSum([u64; 6]);

impl ExactSum {
    /// (integer mantissa, bit position) with x = mantissa · 2^(position − 149).
    #[inline]
    fn parts(x: f32) -> (u128, u32) {
        debug_assert!(
            x.is_finite() && x >= 0.0,
            "ExactSum takes finite values >= 0, got {x}"
        );
        let bits = x.to_bits() & 0x7fff_ffff; // -0.0 adds like +0.0
        let (e, m) = (bits >> 23, bits & 0x7f_ffff);
        if e == 0 {
            (m as u128, 0) // subnormal: m · 2^-149
        } else {
            ((m | 0x80_0000) as u128, e - 1) // (1.m) · 2^(e−127) = (m + 2^23) · 2^(e−150)
        }
    }

    /// Adds `x` (finite, ≥ 0).
    #[inline]
    pub fn add(&mut self, x: f32) {
        let (m, at) = Self::parts(x);
        let v = m << (at % 64);
        let (mut limb, mut carry) = ((at / 64) as usize, false);
        for part in [v as u64, (v >> 64) as u64] {
            let (a, c1) = self.0[limb].overflowing_add(part);
            let (a, c2) = a.overflowing_add(carry as u64);
            self.0[limb] = a;
            carry = c1 || c2;
            limb += 1;
        }
        while carry {
            let (a, c) = self.0[limb].overflowing_add(1);
            self.0[limb] = a;
            carry = c;
            limb += 1;
        }
    }

    /// Removes `x` (finite, ≥ 0), which must be part of the sum (it was added and not removed).
    #[inline]
    pub fn sub(&mut self, x: f32) {
        let (m, at) = Self::parts(x);
        let v = m << (at % 64);
        let (mut limb, mut borrow) = ((at / 64) as usize, false);
        for part in [v as u64, (v >> 64) as u64] {
            let (a, b1) = self.0[limb].overflowing_sub(part);
            let (a, b2) = a.overflowing_sub(borrow as u64);
            self.0[limb] = a;
            borrow = b1 || b2;
            limb += 1;
        }
        while borrow {
            debug_assert!(limb < 6, "ExactSum::sub of a value that was not added");
            let (a, b) = self.0[limb].overflowing_sub(1);
            self.0[limb] = a;
            borrow = b;
            limb += 1;
        }
    }

    /// The sum, correctly rounded (to nearest, ties to even) to f64.
    pub fn to_f64(&self) -> f64 {
        let Some(top) = (0..6).rev().find(|&i| self.0[i] != 0) else {
            return 0.0;
        };
        // A 128-bit window whose highest limb is the top one, and whether anything below it is set.
        let (window, base, below) = if top == 0 {
            (self.0[0] as u128, 0i32, false)
        } else {
            let w = (self.0[top] as u128) << 64 | self.0[top - 1] as u128;
            (
                w,
                64 * (top as i32 - 1),
                self.0[..top - 1].iter().any(|&l| l != 0),
            )
        };
        let lz = window.leading_zeros();
        let shifted = window << lz;
        // 64 leading bits with the rest folded into a sticky bit: u64 → f64 then rounds as the
        // whole number would (64 > 53 + 2 bits, so the sticky bit only breaks ties).
        let sticky = (shifted as u64 != 0 || below) as u64;
        let head = (shifted >> 64) as u64 | sticky;
        // head's lowest bit weighs 2^(base + 64 − lz − 149); |exponent| < 1000, so exact.
        let exponent = base + 64 - lz as i32 - 149;
        head as f64 * f64::from_bits(((exponent + 1023) as u64) << 52)
    }
}

/// Summary returned by [`PassRatePool::stats`].
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub prompts: usize,
    pub slots: usize,
    pub bytes: usize,
    pub updates: u64,
    pub scale: f64,
    /// Σ forgotten evidence over the pool.
    pub successes: f64,
    pub failures: f64,
    /// Pool-level class means of the noise proxy (success, failure); `None` for a class
    /// without any noise observation.
    pub noise_means: [Option<f64>; 2],
}

/// Switches of [`PassRatePool::allocate`]; `None` picks the rule's default (on for
/// "proportional", off otherwise).
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolAllocateOptions<'a> {
    /// Ids not in the pool get `exploration_rollouts` (the reference's exploration budget).
    pub exploration: Option<bool>,
    /// Ids whose posterior mean ≥ `mastery_threshold` get the floor priority.
    pub mastery: Option<bool>,
    pub exploration_rollouts: Option<i64>,
    pub mastery_threshold: Option<f64>,
    pub priority_floor: Option<f64>,
    /// Rule "neyman", `lo = 0`: the skipping rule of `skip.rs` on the posterior variances.
    pub skip_factor: Option<f64>,
    /// Rule "neyman", `lo = 0`: 0 or at least this many rollouts per prompt (`skip.rs`).
    pub min_rollouts: Option<i64>,
    /// Allocate on the revisit-calibrated variances (`calibration.rs`) instead of the plain
    /// posterior expected variances. `None` = off.
    pub calibrated: Option<bool>,
    /// The advantage estimator whose update variance is minimised (`estimator.rs`); `None` =
    /// Σ v_i/n_i. Rule "neyman" only, without exploration or mastery.
    pub estimator: Option<Estimator>,
    /// With `skip_factor > 0` only: a prompt is skipped only if an exploration draw p̃ (from
    /// Beta(1 + s·c, 1 + f·c), its evidence capped at 16 trials, `explore.rs`) also has
    /// p̃(1 − p̃) below the cut; the draw is a pure function of (seed, id, update count).
    /// `None` = off.
    pub explore_seed: Option<u64>,
    /// An explicit per-prompt noise scale s (shape of `ids`, finite, > 0): the objective's
    /// variances (or group_norm's costs) are multiplied by it (`allocate::Options::scale`).
    pub scale: Option<&'a [f64]>,
    /// `Some(true)`: use the pool's own [`PassRatePool::noise_scale`] as the scale (not with
    /// `scale`). A pool without noise observations gives 1 everywhere: today's allocation.
    pub noise_scale: Option<bool>,
    /// Priced skipping (`priced.rs`) with price κ (finite, > 0): skipping prompt i costs
    /// κ·E[p²(1−p)²] under its posterior (times its calibration factor when calibrated, and
    /// the scale), the model of the squared expected gradient it would have carried. Rule
    /// "neyman" with an rloo-family estimator, `lo = 0`, `min_rollouts ≥ 2`. With
    /// `explore_seed`, the moment is raised to (p̃(1−p̃))² of the exploration draw where that
    /// is larger, so a settled-looking prompt is re-probed now and then. `None` = off.
    pub skip_price: Option<f64>,
}

/// The noise proxy sums of one update step, one entry per row: Σ q over the row's successful
/// rollouts and over its failed ones (finite, ≥ 0, 0 where the class has no rollouts).
#[derive(Clone, Copy, Debug)]
pub struct NoiseRows<'a> {
    pub success: &'a [f64],
    pub failure: &'a [f64],
}

impl<'a> NoiseRows<'a> {
    /// The pair from two optional arrays: both or neither (else an error naming the missing one).
    pub fn pair(success: Option<&'a [f64]>, failure: Option<&'a [f64]>) -> Result<Option<Self>> {
        match (success, failure) {
            (Some(success), Some(failure)) => Ok(Some(NoiseRows { success, failure })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(Error::invalid(
                "noise_success needs noise_failure too (give both noise sums or neither)",
            )),
            (None, Some(_)) => Err(Error::invalid(
                "noise_failure needs noise_success too (give both noise sums or neither)",
            )),
        }
    }
}

/// Pool-level noise state: the shrinkage weight and, per class (0 = success, 1 = failure),
/// whether the class has a noise observation, and the pool's stored sums (actual = stored ·
/// scale) of q and of the class evidence, kept incrementally from that first observation on.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseTotals {
    /// w0 ≥ 0: pseudo-rollouts at the pool-level class mean in each prompt's class mean.
    pub weight: f64,
    pub started: [bool; 2],
    pub sum: [f64; 2],
    pub count: [f64; 2],
}

impl Default for NoiseTotals {
    fn default() -> Self {
        NoiseTotals {
            weight: DEFAULT_NOISE_WEIGHT,
            started: [false; 2],
            sum: [0.0; 2],
            count: [0.0; 2],
        }
    }
}

impl NoiseTotals {
    /// Pool-level mean of q per class (sum/count; scale-free), `None` for a class without data.
    pub fn means(&self) -> [Option<f64>; 2] {
        [0, 1]
            .map(|c| (self.started[c] && self.count[c] > 0.0).then(|| self.sum[c] / self.count[c]))
    }

    /// Whether the stored state is usable (finite, non-negative; no data for a class that has
    /// not started).
    pub fn is_valid(&self) -> bool {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        ok(self.weight)
            && (0..2).all(|c| {
                ok(self.sum[c])
                    && ok(self.count[c])
                    && (self.started[c] || (self.sum[c] == 0.0 && self.count[c] == 0.0))
            })
    }
}

/// Pool-level inputs of the noise scale: class means (a class without data takes the other's),
/// which classes have data, and w0.
#[derive(Clone, Copy, Debug)]
struct NoiseModel {
    mean: [f64; 2],
    started: [bool; 2],
    weight: f64,
}

#[derive(Clone, Debug)]
pub struct PassRatePool {
    alpha0: f64,
    beta0: f64,
    forget: f64,
    scale: f64,
    updates: u64,
    table: Table,
    calibration: Calibration,
    noise: NoiseTotals,
    /// Exact sums of the stored successes and failures over all entries (actual = sum · scale),
    /// kept with every change of an entry so that [`Self::stats`] needs no O(pool) scan.
    evidence: [ExactSum; 2],
}

pub fn check_noise_weight(weight: f64) -> Result<()> {
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(Error::invalid(format!(
            "noise_weight must be a finite number >= 0, got {weight}"
        )));
    }
    Ok(())
}

/// Checks one step's noise sums against its counts (counts already checked).
fn check_noise_rows(successes: &[i64], trials: &[i64], noise: &NoiseRows) -> Result<()> {
    let n = successes.len();
    for (name, xs) in [
        ("noise_success", noise.success),
        ("noise_failure", noise.failure),
    ] {
        if xs.len() != n {
            return Err(Error::invalid(format!(
                "{name} has length {} but prompt_ids has length {n}",
                xs.len()
            )));
        }
        if let Some(j) = xs.iter().position(|&x| !(0.0..f64::INFINITY).contains(&x)) {
            return Err(allocate::describe_invalid(name, j, xs[j]));
        }
        if let Some(j) = xs.iter().position(|&x| x > MAX_NOISE) {
            return Err(Error::invalid(format!(
                "{name}[{j}] = {:?} is above {MAX_NOISE:e} (the pool keeps float32 sums)",
                xs[j]
            )));
        }
    }
    for j in 0..n {
        let (k, rest) = (successes[j], trials[j] - successes[j]);
        if k == 0 && noise.success[j] != 0.0 {
            return Err(Error::invalid(format!(
                "noise_success[{j}] = {:?} but successes[{j}] = 0 (a class without rollouts \
                 has no noise sum)",
                noise.success[j]
            )));
        }
        if rest == 0 && noise.failure[j] != 0.0 {
            return Err(Error::invalid(format!(
                "noise_failure[{j}] = {:?} but trials[{j}] - successes[{j}] = 0 (a class \
                 without rollouts has no noise sum)",
                noise.failure[j]
            )));
        }
    }
    Ok(())
}

/// Refuses the switches in `given` that are on when the rule is "uniform" (it takes none), the
/// first in the order given.
fn check_uniform_switches(rule: Rule, given: &[(&str, bool)]) -> Result<()> {
    if rule != Rule::Uniform {
        return Ok(());
    }
    match given.iter().find(|(_, on)| *on) {
        Some((name, _)) => Err(Error::invalid(format!(
            "{name} does not apply to rule 'uniform' (it takes no options)"
        ))),
        None => Ok(()),
    }
}

/// One on/off switch of [`PassRatePool::allocate`] against the rule: `Some(true)` is refused
/// with rule "uniform".
pub fn check_uniform_switch(rule: Rule, name: &str, switch: Option<bool>) -> Result<()> {
    check_uniform_switches(rule, &[(name, switch == Some(true))])
}

/// `noise_scale` of [`PassRatePool::allocate`] against the rule: `Some(true)` is refused with
/// rule "uniform", which spreads the budget evenly whatever the variances (the noise scale
/// multiplies each prompt's variance, so only the rules that weigh prompts by it can use it).
pub fn check_noise_scale_switch(rule: Rule, switch: Option<bool>) -> Result<()> {
    if rule == Rule::Uniform && switch == Some(true) {
        return Err(Error::invalid(
            "noise_scale does not apply to rule 'uniform' (it weighs each prompt's variance by its \
             noise scale: only rules 'neyman' and 'proportional' weigh prompts by variance)",
        ));
    }
    Ok(())
}

/// The reference's exploration and mastery switches as they apply: given, or the rule's
/// default (on for "proportional", off otherwise).
pub fn reference_switches(rule: Rule, o: &PoolAllocateOptions) -> (bool, bool) {
    let reference = rule == Rule::Proportional;
    (
        o.exploration.unwrap_or(reference),
        o.mastery.unwrap_or(reference),
    )
}

/// The reference's options of [`PassRatePool::allocate`] (exploration, mastery and their
/// numbers): none with rule "uniform"; `exploration_rollouts` only with exploration,
/// `mastery_threshold` only with mastery, and with rule "neyman" `priority_floor` only with
/// mastery (its only use there).
pub fn check_reference_options(rule: Rule, o: &PoolAllocateOptions) -> Result<()> {
    check_uniform_switches(
        rule,
        &[
            ("exploration", o.exploration == Some(true)),
            ("mastery", o.mastery == Some(true)),
            ("exploration_rollouts", o.exploration_rollouts.is_some()),
            ("mastery_threshold", o.mastery_threshold.is_some()),
            ("priority_floor", o.priority_floor.is_some()),
        ],
    )?;
    let (exploration, mastery) = reference_switches(rule, o);
    if o.exploration_rollouts.is_some() && !exploration {
        return Err(Error::invalid(
            "exploration_rollouts has no effect without exploration",
        ));
    }
    if o.mastery_threshold.is_some() && !mastery {
        return Err(Error::invalid(
            "mastery_threshold has no effect without mastery",
        ));
    }
    if rule == Rule::Neyman && o.priority_floor.is_some() && !mastery {
        return Err(Error::invalid(
            "priority_floor has no effect for rule 'neyman' without mastery",
        ));
    }
    Ok(())
}

/// The pool's estimator rule: "neyman" only, and not with the reference's exploration or
/// mastery (as they apply: [`reference_switches`]).
pub fn check_pool_estimator(e: Estimator, rule: Rule, o: &PoolAllocateOptions) -> Result<()> {
    if rule != Rule::Neyman {
        return Err(Error::invalid(format!(
            "estimator applies to rule 'neyman' only, got rule '{}' with estimator '{}'",
            rule.name(),
            e.name()
        )));
    }
    let (exploration, mastery) = reference_switches(rule, o);
    for (name, on) in [("exploration", exploration), ("mastery", mastery)] {
        if on {
            return Err(Error::invalid(format!(
                "estimator '{}' cannot be combined with {name} (the reference's exploration \
                 and mastery options)",
                e.name()
            )));
        }
    }
    Ok(())
}

/// `explore_seed` needs a skipping rule (`skip_factor > 0` or `skip_price`): without one no
/// prompt is skipped, so there is nothing to re-probe.
pub fn check_explore_seed(o: &PoolAllocateOptions) -> Result<()> {
    let skipping = o.skip_factor.is_some_and(|f| f > 0.0);
    if o.explore_seed.is_some() && !skipping && o.skip_price.is_none() {
        return Err(Error::invalid(format!(
            "explore_seed applies to the skipping rules only (skip_factor > 0 or skip_price), \
             got skip_factor = {:?}",
            o.skip_factor
        )));
    }
    Ok(())
}

/// `skip_price` when given: finite and > 0, then priced skipping's preconditions on the rule,
/// estimator, `lo`, `min_rollouts` and `skip_factor` (`priced::check_settings`).
pub fn check_skip_price_settings(rule: Rule, o: &PoolAllocateOptions, lo: i64) -> Result<()> {
    let Some(price) = o.skip_price else {
        return Ok(());
    };
    check_skip_price(price)?;
    crate::priced::check_settings(
        "skip_price",
        rule,
        o.estimator,
        lo,
        o.min_rollouts,
        o.skip_factor,
    )
}

/// The priced-skip price κ must be finite and > 0.
fn check_skip_price(price: f64) -> Result<()> {
    if price.is_finite() && price > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "skip_price must be finite and > 0, got {price}"
        )))
    }
}

pub fn check_prior(alpha0: f64, beta0: f64) -> Result<()> {
    for (name, x) in [("alpha0", alpha0), ("beta0", beta0)] {
        if !(x > 0.0 && x.is_finite()) {
            return Err(Error::invalid(format!(
                "prior {name} must be a finite positive number, got {x}"
            )));
        }
    }
    Ok(())
}

pub fn check_forget(forget: f64) -> Result<()> {
    if !(forget > 0.0 && forget <= 1.0) {
        return Err(Error::invalid(format!(
            "forget must lie in (0, 1], got {forget}"
        )));
    }
    Ok(())
}

fn check_counts(ids: &[i64], successes: &[i64], trials: &[i64]) -> Result<()> {
    for (name, len) in [("successes", successes.len()), ("trials", trials.len())] {
        if len != ids.len() {
            return Err(Error::invalid(format!(
                "{name} has length {len} but prompt_ids has length {}",
                ids.len()
            )));
        }
    }
    for (j, (&s, &t)) in successes.iter().zip(trials).enumerate() {
        if t < 0 {
            return Err(Error::invalid(format!("trials[{j}] is negative ({t})")));
        }
        if s < 0 {
            return Err(Error::invalid(format!("successes[{j}] is negative ({s})")));
        }
        if s > t {
            return Err(Error::invalid(format!(
                "successes[{j}] = {s} exceeds trials[{j}] = {t}"
            )));
        }
    }
    Ok(())
}

impl PassRatePool {
    /// An empty pool with prior Beta(alpha0, beta0) and forgetting factor `forget` ∈ (0, 1],
    /// sized for `capacity` prompts without growing; noise shrinkage weight 1.
    pub fn new(alpha0: f64, beta0: f64, forget: f64, capacity: usize) -> Result<Self> {
        check_prior(alpha0, beta0)?;
        check_forget(forget)?;
        Ok(PassRatePool {
            alpha0,
            beta0,
            forget,
            scale: 1.0,
            updates: 0,
            table: Table::with_prompts(capacity),
            calibration: Calibration::default(),
            noise: NoiseTotals::default(),
            evidence: [ExactSum::default(); 2],
        })
    }

    pub fn prior(&self) -> (f64, f64) {
        (self.alpha0, self.beta0)
    }

    pub fn set_prior(&mut self, alpha0: f64, beta0: f64) -> Result<()> {
        check_prior(alpha0, beta0)?;
        self.alpha0 = alpha0;
        self.beta0 = beta0;
        Ok(())
    }

    pub fn forget(&self) -> f64 {
        self.forget
    }

    /// Changes ρ for the following steps; evidence already forgotten stays as it is.
    pub fn set_forget(&mut self, forget: f64) -> Result<()> {
        check_forget(forget)?;
        self.forget = forget;
        Ok(())
    }

    /// The noise shrinkage weight w0 (see [`Self::noise_scale`]).
    pub fn noise_weight(&self) -> f64 {
        self.noise.weight
    }

    /// Changes w0; takes effect at once (only `noise_scale` reads it).
    pub fn set_noise_weight(&mut self, weight: f64) -> Result<()> {
        check_noise_weight(weight)?;
        self.noise.weight = weight;
        Ok(())
    }

    /// The pool-level noise state (for the file format and tests).
    pub fn noise_totals(&self) -> &NoiseTotals {
        &self.noise
    }

    /// Replaces the pool-level noise state (e.g. when loading a file).
    pub fn set_noise_totals(&mut self, noise: NoiseTotals) -> Result<()> {
        if !noise.is_valid() {
            return Err(Error::invalid("invalid noise statistics"));
        }
        self.noise = noise;
        Ok(())
    }

    /// Pool-level class means of the noise proxy (success, failure); `None` without data.
    pub fn noise_means(&self) -> [Option<f64>; 2] {
        self.noise.means()
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: i64) -> bool {
        self.table.get(id).is_some()
    }

    /// Number of slots of the hash table (capacity before growth is `slots · 0.8`).
    pub fn slots(&self) -> usize {
        self.table.slots.len()
    }

    /// One training step without noise observations: [`Self::update_with_noise`] with `None`.
    pub fn update(&mut self, ids: &[i64], successes: &[i64], trials: &[i64]) -> Result<()> {
        self.update_with_noise(ids, successes, trials, None)
    }

    /// One training step: forget (multiply all evidence and noise sums by ρ), then add the
    /// counts and, per row, the noise sums of its successful and failed rollouts. Entries with
    /// zero trials add nothing and create no entry; repeated ids add up. Everything is checked
    /// before anything changes.
    ///
    /// Noise: the first step that brings a class's (success or failure) noise observations
    /// (with at least one rollout of that class) starts the class: the evidence of that class
    /// recorded before has no q, so it is counted at that step's mean q of the class (one
    /// O(pool) pass, once per class). From then on every rollout of the class carries a q:
    /// observed when `noise` is given, else imputed at the pool-level class mean at the start
    /// of the step. So each prompt's class count is its class evidence, and a step without
    /// noise observations leaves the pool-level means unchanged.
    pub fn update_with_noise(
        &mut self,
        ids: &[i64],
        successes: &[i64],
        trials: &[i64],
        noise: Option<NoiseRows>,
    ) -> Result<()> {
        check_counts(ids, successes, trials)?;
        if let Some(n) = &noise {
            check_noise_rows(successes, trials, n)?;
        }
        // Revisit calibration: each row with 2+ trials against the posterior before this step.
        let observations: Vec<Observation> = (0..ids.len())
            .filter(|&j| trials[j] >= 2)
            .map(|j| {
                let (s, f) = self.evidence_of(ids[j]);
                let cell = calibration::cell(s, f);
                Observation::new(cell, self.variance_at(s, f), successes[j], trials[j])
            })
            .collect();
        self.calibration.step(&observations);
        // Nothing stored yet means nothing to forget: keep the scale at 1 (exact evidence).
        self.scale = if self.is_empty() {
            1.0
        } else {
            self.scale * self.forget
        };
        if self.scale < SCALE_FLOOR {
            self.renormalise();
        }
        self.updates += 1;
        if let Some(n) = &noise {
            let mut q = [0.0f64; 2];
            let mut k = [0.0f64; 2];
            for j in 0..ids.len() {
                q[0] += n.success[j];
                q[1] += n.failure[j];
                k[0] += successes[j] as f64;
                k[1] += (trials[j] - successes[j]) as f64;
            }
            for c in 0..2 {
                if !self.noise.started[c] && k[c] > 0.0 {
                    self.start_noise_class(c, q[c] / k[c]);
                }
            }
        }
        // q of a rollout without observation: the class mean before this step's rows.
        let imputed = self.noise.means().map(|m| m.unwrap_or(0.0));
        // Lookups in a large table miss the cache; prefetching a few ahead overlaps the misses.
        const AHEAD: usize = 8;
        for &id in ids.iter().take(AHEAD) {
            self.table.prefetch_home(id);
        }
        for j in 0..ids.len() {
            if let Some(&ahead) = ids.get(j + AHEAD) {
                self.table.prefetch_home(ahead);
            }
            if trials[j] == 0 {
                continue;
            }
            let (s, f) = (successes[j] as f64, (trials[j] - successes[j]) as f64);
            let (qs, qf) = match &noise {
                Some(n) => (n.success[j], n.failure[j]),
                None => (imputed[0] * s, imputed[1] * f),
            };
            let row = [s, f, qs, qf];
            if !self.add(ids[j], row) {
                // Stored values would overflow f32: fold the scale in and add again.
                self.renormalise();
                let added = self.add(ids[j], row);
                debug_assert!(added);
            }
        }
        Ok(())
    }

    /// Starts noise class `c` (0 = success, 1 = failure): the class evidence stored so far is
    /// given q sums at `mean` per rollout, and the pool totals of the class are set. O(pool).
    fn start_noise_class(&mut self, c: usize, mean: f64) {
        // Stored values become actual ones, so that evidence · mean stays within float32.
        self.renormalise();
        let (mut sum, mut count) = (0.0f64, 0.0f64);
        for e in self.table.entries_mut() {
            let (n, q) = if c == 0 {
                (e.successes, &mut e.noise_success)
            } else {
                (e.failures, &mut e.noise_failure)
            };
            *q = (n as f64 * mean).min(f32::MAX as f64) as f32;
            sum += *q as f64;
            count += n as f64;
        }
        self.noise.started[c] = true;
        self.noise.sum[c] = sum;
        self.noise.count[c] = count;
    }

    /// Adds actual values [successes, failures, noise success, noise failure] to `id`'s entry
    /// and to the pool totals of started noise classes; false (and nothing changed but an
    /// empty entry) if a stored value would overflow.
    #[inline]
    fn add(&mut self, id: i64, x: [f64; 4]) -> bool {
        let inv = 1.0 / self.scale;
        let e = self.table.entry(id);
        let old = [e.successes, e.failures, e.noise_success, e.noise_failure];
        let new: [f32; 4] = std::array::from_fn(|k| (old[k] as f64 + x[k] * inv) as f32);
        if !new.iter().all(|v| v.is_finite()) {
            return false;
        }
        for c in 0..2 {
            self.evidence[c].sub(old[c]);
            self.evidence[c].add(new[c]);
        }
        [e.successes, e.failures, e.noise_success, e.noise_failure] = new;
        for c in 0..2 {
            if self.noise.started[c] {
                self.noise.count[c] += x[c] * inv;
                self.noise.sum[c] += x[2 + c] * inv;
            }
        }
        true
    }

    /// Folds the global scale into every entry and the noise totals (O(pool)), leaving the
    /// scale at 1.
    pub fn renormalise(&mut self) {
        let g = self.scale;
        if g == 1.0 {
            return;
        }
        for e in self.table.entries_mut() {
            for x in [
                &mut e.successes,
                &mut e.failures,
                &mut e.noise_success,
                &mut e.noise_failure,
            ] {
                *x = (*x as f64 * g) as f32;
            }
        }
        for c in 0..2 {
            self.noise.sum[c] *= g;
            self.noise.count[c] *= g;
        }
        self.evidence = self.scan_evidence();
        self.scale = 1.0;
    }

    /// Forgotten evidence (successes, failures) above the prior; (0, 0) for unseen ids.
    #[inline]
    pub fn evidence_of(&self, id: i64) -> (f64, f64) {
        match self.table.get(id) {
            Some(e) => (
                e.successes as f64 * self.scale,
                e.failures as f64 * self.scale,
            ),
            None => (0.0, 0.0),
        }
    }

    /// Forgotten noise sums (Σq over successes, Σq over failures) of one id; (0, 0) for unseen
    /// ids.
    #[inline]
    pub fn noise_sums_of(&self, id: i64) -> (f64, f64) {
        match self.table.get(id) {
            Some(e) => (
                e.noise_success as f64 * self.scale,
                e.noise_failure as f64 * self.scale,
            ),
            None => (0.0, 0.0),
        }
    }

    /// Per id, the forgotten noise sums (success class, failure class).
    pub fn noise_sums(&self, ids: &[i64]) -> (Vec<f64>, Vec<f64>) {
        self.map_ids(ids, |p, id| p.noise_sums_of(id))
            .into_iter()
            .unzip()
    }

    /// Per-prompt noise scale ŝ = (1 − m)·Q_succ + m·Q_fail, m the posterior mean pass rate and
    /// Q_c = (Σq_c + w0·M_c)/(n_c + w0) the prompt's class mean of q shrunk toward the
    /// pool-level class mean M_c (n_c: the class evidence; Q_c = M_c exactly when n_c = 0, e.g.
    /// for unseen ids). A class without any observation takes the other class's M; with no
    /// observation at all every ŝ is 1.
    pub fn noise_scale(&self, ids: &[i64]) -> Vec<f64> {
        match self.noise_model() {
            None => vec![1.0; ids.len()],
            Some(n) => self.map_ids(ids, |p, id| {
                p.noise_scale_at(&p.table.get(id).unwrap_or(EMPTY_SLOT), &n)
            }),
        }
    }

    /// The pool-level part of [`Self::noise_scale`]; `None` without any noise observation.
    fn noise_model(&self) -> Option<NoiseModel> {
        let started = self.noise.means();
        let (success, failure) = match started {
            [None, None] => return None,
            [Some(a), None] => (a, a),
            [None, Some(b)] => (b, b),
            [Some(a), Some(b)] => (a, b),
        };
        Some(NoiseModel {
            mean: [success, failure],
            started: started.map(|m| m.is_some()),
            weight: self.noise.weight,
        })
    }

    /// ŝ of one entry (an empty slot for an unseen id).
    #[inline]
    fn noise_scale_at(&self, e: &Slot, n: &NoiseModel) -> f64 {
        let g = self.scale;
        let (s, f) = (e.successes as f64 * g, e.failures as f64 * g);
        let class = |c: usize, sum: f32, count: f64| {
            if n.started[c] && count > 0.0 {
                (sum as f64 * g + n.weight * n.mean[c]) / (count + n.weight)
            } else {
                n.mean[c]
            }
        };
        let (q_s, q_f) = (class(0, e.noise_success, s), class(1, e.noise_failure, f));
        let (a, b) = (self.alpha0 + s, self.beta0 + f);
        let m = a / (a + b);
        (1.0 - m) * q_s + m * q_f
    }

    /// Posterior expected variance E[p(1−p)] for forgotten evidence (s, f).
    #[inline]
    fn variance_at(&self, s: f64, f: f64) -> f64 {
        let (a, b) = (self.alpha0 + s, self.beta0 + f);
        a * b / ((a + b) * (a + b + 1.0))
    }

    /// Posterior Beta parameters (α, β) of one id.
    #[inline]
    pub fn posterior_of(&self, id: i64) -> (f64, f64) {
        let (s, f) = self.evidence_of(id);
        (self.alpha0 + s, self.beta0 + f)
    }

    fn map_ids<T: Send>(&self, ids: &[i64], f: impl Fn(&Self, i64) -> T + Sync + Send) -> Vec<T> {
        map_chunks(ids, |_, chunk| {
            let mut out = Vec::with_capacity(chunk.len());
            const AHEAD: usize = 8;
            for (j, &id) in chunk.iter().enumerate() {
                if let Some(&ahead) = chunk.get(j + AHEAD) {
                    self.table.prefetch_home(ahead);
                }
                out.push(f(self, id));
            }
            out
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Posterior mean α/(α+β) per id (the prior mean for unseen ids).
    pub fn mean(&self, ids: &[i64]) -> Vec<f64> {
        self.map_ids(ids, |p, id| {
            let (a, b) = p.posterior_of(id);
            a / (a + b)
        })
    }

    /// Posterior expected Bernoulli variance E[p(1−p)] = αβ/((α+β)(α+β+1)) per id.
    pub fn expected_variance(&self, ids: &[i64]) -> Vec<f64> {
        self.map_ids(ids, |p, id| {
            let (s, f) = p.evidence_of(id);
            p.variance_at(s, f)
        })
    }

    /// Revisit-calibrated expected variance per id: the posterior's E[p(1−p)] times the factor
    /// of the id's evidence cell (`calibration.rs`); equal to it while the cell has no data.
    pub fn calibrated_variance(&self, ids: &[i64]) -> Vec<f64> {
        self.map_ids(ids, |p, id| {
            let (s, f) = p.evidence_of(id);
            p.variance_at(s, f) * p.calibration.factor(calibration::cell(s, f))
        })
    }

    /// The revisit-calibration state.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// Replaces the revisit-calibration state (e.g. when loading a file).
    pub fn set_calibration(&mut self, c: Calibration) -> Result<()> {
        if !c.is_valid() {
            return Err(Error::invalid("invalid calibration state"));
        }
        self.calibration = c;
        Ok(())
    }

    pub fn evidence(&self, ids: &[i64]) -> (Vec<f64>, Vec<f64>) {
        self.map_ids(ids, |p, id| p.evidence_of(id))
            .into_iter()
            .unzip()
    }

    pub fn contains_each(&self, ids: &[i64]) -> Vec<bool> {
        self.map_ids(ids, |p, id| p.contains(id))
    }

    /// Allocates `budget` rollouts over the batch `ids` from the posterior expected variances.
    pub fn allocate(
        &self,
        ids: &[i64],
        budget: i64,
        lo: i64,
        hi: i64,
        rule: Rule,
        o: &PoolAllocateOptions,
    ) -> Result<Vec<i64>> {
        let (exploration, mastery) = reference_switches(rule, o);
        check_reference_options(rule, o)?;
        check_uniform_switch(rule, "calibrated", o.calibrated)?;
        check_noise_scale_switch(rule, o.noise_scale)?;
        if let Some(e) = o.estimator {
            check_pool_estimator(e, rule, o)?;
        }
        allocate::check_bounds(ids.len(), budget, lo, hi)?;
        // The scale: explicit, the pool's own noise scale (computed in the lookups below), or
        // none (also when the pool has no noise observation: every ŝ would be 1, and
        // w = v·1 = v anyway).
        let own_noise = if o.noise_scale == Some(true) {
            if o.scale.is_some() {
                return Err(Error::invalid(
                    "scale and noise_scale cannot be combined (noise_scale=True uses the \
                     pool's own noise_scale(prompt_ids) as the scale)",
                ));
            }
            self.noise_model()
        } else {
            None
        };
        if let Some(s) = o.scale {
            allocate::check_scale(s, ids.len(), "prompt_ids")?;
        }
        let check_own = |s: &[f64]| -> Result<()> {
            match s.iter().position(|&x| !(x > 0.0 && x < f64::INFINITY)) {
                Some(i) => Err(Error::invalid(format!(
                    "noise_scale=True: the pool's noise scale of prompt_ids[{i}] (id {}) is {:?}, \
                     not > 0 (its noise observations are all 0); pass an explicit scale",
                    ids[i], s[i]
                ))),
                None => Ok(()),
            }
        };
        let calibrated = o.calibrated == Some(true);
        let skipping = o.skip_factor.is_some_and(|f| f > 0.0);
        check_skip_price_settings(rule, o, lo)?;
        check_explore_seed(o)?;
        if let Some(e) = o
            .estimator
            .filter(|e| e.objective() == Objective::GroupNorm)
        {
            e.check(lo, o.skip_factor, o.min_rollouts)?;
            // lo ≥ 2 here, so skip_factor/min_rollouts (lo = 0 options) cannot apply.
            allocate::Options {
                skip_factor: o.skip_factor,
                min_rollouts: o.min_rollouts,
                ..Options::default()
            }
            .selection()
            .check(budget, lo, hi)?;
            // One lookup per id: posterior (α, β) and, when asked for, the cell's calibration
            // factor and the noise scale.
            let looked_up = self.map_ids(ids, |p, id| {
                let e = p.table.get(id).unwrap_or(EMPTY_SLOT);
                let (s, f) = (e.successes as f64 * p.scale, e.failures as f64 * p.scale);
                let factor = if calibrated {
                    p.calibration.factor(calibration::cell(s, f))
                } else {
                    1.0
                };
                let noise = own_noise.map_or(1.0, |n| p.noise_scale_at(&e, &n));
                (p.alpha0 + s, p.beta0 + f, factor, noise)
            });
            let alpha: Vec<f64> = looked_up.iter().map(|x| x.0).collect();
            let beta: Vec<f64> = looked_up.iter().map(|x| x.1).collect();
            let own: Option<Vec<f64>> = own_noise.map(|_| looked_up.iter().map(|x| x.3).collect());
            if let Some(s) = &own {
                check_own(s)?;
            }
            // The cost factor: calibration factor times the noise scale, either, or none.
            let scale = match (calibrated, own.as_deref().or(o.scale)) {
                (false, None) => None,
                (true, None) => Some(looked_up.iter().map(|x| x.2).collect::<Vec<f64>>()),
                (false, Some(s)) => Some(s.to_vec()),
                (true, Some(s)) => Some(looked_up.iter().zip(s).map(|(x, y)| x.2 * y).collect()),
            };
            drop(looked_up);
            let (lo, hi) = (lo as u64, hi as u64);
            estimator::check_group_norm(&alpha, &beta, scale.as_deref(), budget as u64, lo, hi)?;
            return Ok(estimator::solve_group_norm(
                &alpha,
                &beta,
                scale.as_deref(),
                budget as u64,
                lo,
                hi,
            ));
        }
        // One lookup per id for the variances and, with noise_scale, the noise scale.
        let (variances, own) = match own_noise {
            Some(n) => {
                let (v, s): (Vec<f64>, Vec<f64>) = self
                    .map_ids(ids, |p, id| {
                        let e = p.table.get(id).unwrap_or(EMPTY_SLOT);
                        let (s, f) = (e.successes as f64 * p.scale, e.failures as f64 * p.scale);
                        let mut v = p.variance_at(s, f);
                        if calibrated {
                            v *= p.calibration.factor(calibration::cell(s, f));
                        }
                        (v, p.noise_scale_at(&e, &n))
                    })
                    .into_iter()
                    .unzip();
                check_own(&s)?;
                (v, Some(s))
            }
            None if calibrated => (self.calibrated_variance(ids), None),
            None => (self.expected_variance(ids), None),
        };
        let scale = own.as_deref().or(o.scale);
        let skip_costs = o
            .skip_price
            .map(|k| self.skip_costs(ids, k, calibrated, o.explore_seed))
            .transpose()?;
        // Skipping on calibrated variances: a prompt is skipped only if its plain posterior
        // variance is below the cut too. (A skipped prompt gets no revisit, so a calibration
        // factor that is too low could not correct itself.)
        let mut guard = (calibrated && skipping).then(|| self.expected_variance(ids));
        // Exploration: the exploration draw's variance joins the guard (skipped only if it is
        // below the cut too).
        if let Some(seed) = o.explore_seed.filter(|_| skipping) {
            let step = self.updates;
            let draws = self.map_ids(ids, |p, id| {
                let (s, f) = p.evidence_of(id);
                crate::explore::exploration_variance(s, f, seed, id, step)
            });
            guard = Some(match guard {
                Some(g) => g.iter().zip(&draws).map(|(x, y)| x.max(*y)).collect(),
                None => draws,
            });
        }
        let unseen: Option<Vec<bool>> =
            exploration.then(|| self.contains_each(ids).into_iter().map(|c| !c).collect());
        let pass_rates = mastery.then(|| self.mean(ids));
        let options = Options {
            unseen: unseen.as_deref(),
            exploration_rollouts: o.exploration_rollouts,
            pass_rates: pass_rates.as_deref(),
            mastery_threshold: o.mastery_threshold,
            priority_floor: o.priority_floor,
            skip_factor: o.skip_factor,
            min_rollouts: o.min_rollouts,
            estimator: o.estimator,
            scale,
            skip_costs: skip_costs.as_deref(),
        };
        allocate::allocate_guarded(&variances, guard.as_deref(), budget, lo, hi, rule, &options)
    }

    /// The priced-skip costs of `ids` (`PoolAllocateOptions::skip_price`): κ·E[p²(1−p)²] under
    /// each posterior, times the calibration factor when `calibrated`, raised to κ·(p̃(1−p̃))² of
    /// the exploration draw with an `explore_seed` where that is larger.
    pub fn skip_costs(
        &self,
        ids: &[i64],
        price: f64,
        calibrated: bool,
        explore_seed: Option<u64>,
    ) -> Result<Vec<f64>> {
        check_skip_price(price)?;
        let step = self.updates;
        Ok(self.map_ids(ids, |p, id| {
            let (s, f) = p.evidence_of(id);
            let mut u = crate::priced::squared_variance_moment(p.alpha0 + s, p.beta0 + f);
            if let Some(seed) = explore_seed {
                let d = crate::explore::exploration_variance(s, f, seed, id, step);
                u = u.max(d * d);
            }
            if calibrated {
                u *= p.calibration.factor(calibration::cell(s, f));
            }
            price * u
        }))
    }

    /// Empirical-Bayes fit of the prior by the method of moments with binomial-noise correction,
    /// over prompts with at least one trial of (forgotten) evidence. With p̂_i = s_i/n_i:
    /// μ = mean p̂_i, S² = sample variance of p̂_i, c = mean 1/n_i, and for a Beta prior with
    /// φ = 1/(α+β+1): E[S²] ≈ μ(1−μ)(c + φ(1−c)). So φ = (S²/(μ(1−μ)) − c)/(1 − c), clamped to
    /// [1e-6, 1/1.001] (α+β between 1e-3 and ~1e6), α = μ(1/φ − 1), β = (1−μ)(1/φ − 1).
    /// Sets the fitted prior and returns it.
    pub fn fit_prior(&mut self) -> Result<(f64, f64)> {
        let g = self.scale;
        // (p̂, n) of an entry with at least one trial of evidence.
        let observe = move |e: &Slot| -> Option<(f64, f64)> {
            let (s, f) = (e.successes as f64 * g, e.failures as f64 * g);
            let n = s + f;
            (n >= 1.0).then_some((s / n, n))
        };
        let marker_entry: Vec<Slot> = self.table.entries().filter(|e| e.id == EMPTY).collect();
        let occupied = |slots: &[Slot]| -> Vec<(f64, f64)> {
            slots
                .iter()
                .filter(|e| e.id != EMPTY)
                .filter_map(observe)
                .collect()
        };
        // Two passes (mean, then centred squares) for accuracy; each over chunks of the table.
        let first = |obs: Vec<(f64, f64)>| -> (f64, f64, f64) {
            obs.iter().fold((0.0, 0.0, 0.0), |(m, sp, si), &(p, n)| {
                (m + 1.0, sp + p, si + 1.0 / n)
            })
        };
        let (count, sum_p, sum_inv) = map_chunks(&self.table.slots, |_, c| first(occupied(c)))
            .into_iter()
            .chain([first(marker_entry.iter().filter_map(observe).collect())])
            .fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
        if count < 2.0 {
            return Err(Error::invalid(format!(
                "fit_prior needs at least 2 prompts with one or more trials of evidence, found {count}"
            )));
        }
        let mu = sum_p / count;
        let inv_n = sum_inv / count;
        if mu <= 0.0 || mu >= 1.0 {
            return Err(Error::invalid(format!(
                "fit_prior needs both successes and failures in the pool (every pass rate is {mu})"
            )));
        }
        if inv_n >= 1.0 - 1e-12 {
            return Err(Error::invalid(
                "fit_prior cannot separate prior spread from binomial noise with one trial per prompt",
            ));
        }
        let second =
            |obs: Vec<(f64, f64)>| -> f64 { obs.iter().map(|&(p, _)| (p - mu) * (p - mu)).sum() };
        let squares: f64 = map_chunks(&self.table.slots, |_, c| second(occupied(c)))
            .into_iter()
            .chain([second(marker_entry.iter().filter_map(observe).collect())])
            .sum();
        let s2 = squares / (count - 1.0);
        let phi = ((s2 / (mu * (1.0 - mu)) - inv_n) / (1.0 - inv_n)).clamp(1e-6, 1.0 / 1.001);
        let strength = 1.0 / phi - 1.0;
        let (a, b) = (mu * strength, (1.0 - mu) * strength);
        self.set_prior(a, b)?;
        Ok((a, b))
    }

    /// Size, memory and evidence totals; O(1) (the totals are kept with every change).
    pub fn stats(&self) -> Stats {
        let [s, f] = self.evidence.map(|x| x.to_f64());
        Stats {
            prompts: self.len(),
            slots: self.table.slots.len(),
            bytes: self.table.bytes() + std::mem::size_of::<Self>(),
            updates: self.updates,
            scale: self.scale,
            successes: s * self.scale,
            failures: f * self.scale,
            noise_means: self.noise.means(),
        }
    }

    /// All ids, in storage order.
    pub fn ids(&self) -> Vec<i64> {
        self.table.entries().map(|e| e.id).collect()
    }

    /// Stored entries (evidence divided by the scale), in the file's order (table order from just
    /// after an empty slot, which a load re-inserts into the same layout); used by the file format.
    pub fn stored_entries(&self) -> impl Iterator<Item = Slot> + '_ {
        self.table.entries_from_gap()
    }

    /// Rebuilds a pool from saved state; entries are added with [`Self::insert_stored`].
    pub fn from_state(
        alpha0: f64,
        beta0: f64,
        forget: f64,
        scale: f64,
        updates: u64,
        prompts: usize,
        slots: usize,
    ) -> Result<Self> {
        check_prior(alpha0, beta0)?;
        check_forget(forget)?;
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(Error::invalid(format!(
                "scale must lie in (0, 1], got {scale}"
            )));
        }
        let mut table = Table::with_prompts(prompts);
        // Same table size as when saved (when it holds the prompts within the load limit), so
        // that a round trip keeps it; re-inserting in saved (table) order stays cache-friendly.
        let holds = prompts as f64 <= MAX_LOAD * slots as f64 && slots >= MIN_SLOTS;
        if holds && slots <= 4 * table.slots.len() {
            table.slots = vec![EMPTY_SLOT; slots];
        }
        Ok(PassRatePool {
            alpha0,
            beta0,
            forget,
            scale,
            updates,
            table,
            calibration: Calibration::default(),
            noise: NoiseTotals::default(),
            evidence: [ExactSum::default(); 2],
        })
    }

    /// Inserts one stored entry (values finite and ≥ 0, as a file's records are checked to be);
    /// false (and nothing changed) if the id is already present.
    pub fn insert_stored(&mut self, slot: Slot) -> bool {
        let fresh = self.table.insert_new(slot);
        if fresh {
            self.evidence[0].add(slot.successes);
            self.evidence[1].add(slot.failures);
        }
        fresh
    }

    /// The exact sums of the stored successes and failures, by a scan of every entry (O(pool)).
    fn scan_evidence(&self) -> [ExactSum; 2] {
        let mut sums = [ExactSum::default(); 2];
        for e in self.table.entries() {
            sums[0].add(e.successes);
            sums[1].add(e.failures);
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neyman::tests::Rng;

    fn pool(forget: f64) -> PassRatePool {
        PassRatePool::new(1.0, 1.0, forget, 0).unwrap()
    }

    #[test]
    fn unseen_ids_use_the_prior() {
        let p = PassRatePool::new(2.0, 6.0, 1.0, 0).unwrap();
        assert_eq!(p.mean(&[5, -7]), vec![0.25, 0.25]);
        assert_eq!(p.expected_variance(&[5]), vec![2.0 * 6.0 / (8.0 * 9.0)]);
        assert!(!p.contains(5));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn update_accumulates_and_duplicates_add_up() {
        let mut p = pool(1.0);
        p.update(&[3, 4, 3], &[2, 0, 1], &[4, 16, 1]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.evidence(&[3, 4, 9]),
            (vec![3.0, 0.0, 0.0], vec![2.0, 16.0, 0.0])
        );
        assert_eq!(p.mean(&[3]), vec![4.0 / 7.0]);
        let (a, b) = (4.0, 3.0);
        assert_eq!(
            p.expected_variance(&[3]),
            vec![a * b / ((a + b) * (a + b + 1.0))]
        );
        // Zero trials create nothing.
        p.update(&[77], &[0], &[0]).unwrap();
        assert!(!p.contains(77));
        assert_eq!(p.updates(), 2);
    }

    #[test]
    fn rejected_update_changes_nothing() {
        let mut p = pool(0.5);
        p.update(&[1, 2], &[1, 1], &[2, 2]).unwrap();
        let before = (p.ids(), p.evidence(&[1, 2]), p.scale(), p.updates());
        let err = p.update(&[1, 5], &[3, 0], &[2, 1]).unwrap_err().to_string();
        assert_eq!(err, "successes[0] = 3 exceeds trials[0] = 2");
        assert_eq!(
            p.update(&[1], &[0], &[-1]).unwrap_err().to_string(),
            "trials[0] is negative (-1)"
        );
        assert_eq!(
            p.update(&[1], &[0, 1], &[1]).unwrap_err().to_string(),
            "successes has length 2 but prompt_ids has length 1"
        );
        assert_eq!(
            (p.ids(), p.evidence(&[1, 2]), p.scale(), p.updates()),
            before
        );
    }

    #[test]
    fn forgetting_multiplies_old_evidence_each_step() {
        let mut p = pool(0.5);
        p.update(&[1], &[4], &[8]).unwrap();
        p.update(&[2], &[1], &[1]).unwrap();
        p.update(&[], &[], &[]).unwrap();
        // Id 1: (4, 4) × 0.5 × 0.5; id 2: (1, 0) × 0.5.
        assert_eq!(p.evidence(&[1, 2]), (vec![1.0, 0.5], vec![1.0, 0.0]));
        // The first step had nothing to forget, so the scale only moved twice.
        assert_eq!(p.scale(), 0.25);
    }

    #[test]
    fn renormalisation_keeps_evidence() {
        let mut p = pool(0.5);
        let mut expected = 0.0f64;
        for step in 0..200 {
            p.update(&[-42, step], &[1, 1], &[3, 1]).unwrap();
            expected = expected * 0.5 + 1.0;
            assert!(p.scale() >= SCALE_FLOOR);
        }
        let (s, f) = p.evidence(&[-42]);
        assert!((s[0] - expected).abs() < 1e-5 && (f[0] - 2.0 * expected).abs() < 1e-5);
        assert_eq!(p.len(), 201);
        // Old entries decayed to (almost) nothing but are still known.
        assert!(p.contains(0) && p.evidence(&[0]).0[0] < 1e-30);
    }

    #[test]
    fn table_grows_and_finds_everything_including_the_marker_id() {
        let mut p = pool(1.0);
        let mut rng = Rng::new(9);
        let mut ids: Vec<i64> = (0..50_000).map(|_| rng.next_u64() as i64).collect();
        ids.push(i64::MIN);
        ids.push(i64::MAX);
        ids.push(0);
        assert_eq!(std::mem::size_of::<Slot>(), 24);
        let mut worst = 0.0f64;
        for chunk in ids.chunks(512) {
            let ones = vec![1i64; chunk.len()];
            p.update(chunk, &ones, &ones).unwrap();
            // Within budget after every step once past the minimum table size.
            if p.len() > 1000 {
                let load = p.table.occupied as f64 / p.slots() as f64;
                assert!((0.66..=MAX_LOAD).contains(&load), "load {load}");
                worst = worst.max(p.stats().bytes as f64 / p.len() as f64);
            }
        }
        assert!(worst <= 36.0 && worst > 34.0, "{worst}");
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(p.len(), unique.len());
        assert!(ids.iter().all(|&id| p.contains(id)));
        // Updating known ids in one large batch does not grow the table.
        let slots = p.slots();
        let ones = vec![1i64; ids.len()];
        p.update(&ids, &ones, &ones).unwrap();
        assert_eq!(p.slots(), slots);
        assert_eq!(p.evidence(&[i64::MIN]).0, vec![2.0]);
    }

    #[test]
    fn fit_prior_recovers_a_beta_prior() {
        // Beta(2, 5) pass rates (for integers a, b, Beta(a, b) is the a-th smallest of a+b−1
        // uniforms), 20 trials per prompt.
        let mut rng = Rng::new(21);
        let mut p = pool(1.0);
        let (a, b) = (2usize, 5usize);
        for id in 0..40_000i64 {
            let mut u: Vec<f64> = (0..a + b - 1).map(|_| rng.unit()).collect();
            u.sort_by(f64::total_cmp);
            let rate = u[a - 1];
            let k = (0..20).filter(|_| rng.unit() < rate).count() as i64;
            p.update(&[id], &[k], &[20]).unwrap();
        }
        let (fa, fb) = p.fit_prior().unwrap();
        assert!(
            (fa - 2.0).abs() < 0.15 && (fb - 5.0).abs() < 0.4,
            "fitted ({fa}, {fb})"
        );
        assert_eq!(p.prior(), (fa, fb));
    }

    #[test]
    fn fit_prior_refuses_degenerate_pools() {
        let mut p = pool(1.0);
        assert!(p.fit_prior().is_err());
        p.update(&[1, 2], &[0, 0], &[5, 5]).unwrap();
        assert!(p
            .fit_prior()
            .unwrap_err()
            .to_string()
            .contains("both successes and failures"));
        let mut q = pool(1.0);
        q.update(&[1, 2], &[0, 1], &[1, 1]).unwrap();
        assert!(q
            .fit_prior()
            .unwrap_err()
            .to_string()
            .contains("one trial per prompt"));
    }

    #[test]
    fn allocate_uses_posterior_variances_and_switches() {
        let mut p = pool(1.0);
        p.update(&[1, 2, 3], &[8, 16, 0], &[16, 16, 16]).unwrap();
        let ids = [1, 2, 3, 4];
        let v = p.expected_variance(&ids);
        let direct = allocate::allocate(&v, 64, 8, 24, Rule::Neyman, &Options::default()).unwrap();
        let pooled = p
            .allocate(
                &ids,
                64,
                8,
                24,
                Rule::Neyman,
                &PoolAllocateOptions::default(),
            )
            .unwrap();
        assert_eq!(direct, pooled);
        // Unseen id 4 (prior variance 1/6) gets more than the solved prompts 2 and 3.
        assert!(pooled[3] > pooled[1] && pooled[3] > pooled[2]);
        let explore = PoolAllocateOptions {
            exploration: Some(true),
            ..Default::default()
        };
        let with_explore = p.allocate(&ids, 64, 2, 40, Rule::Neyman, &explore).unwrap();
        assert_eq!(with_explore[3], 4);
        let bad = PoolAllocateOptions {
            mastery: Some(true),
            ..Default::default()
        };
        assert!(p.allocate(&ids, 64, 8, 24, Rule::Uniform, &bad).is_err());
    }

    #[test]
    fn allocate_passes_the_skipping_options_on() {
        let mut p = pool(1.0);
        // Prompt 3: 1000 failures → tiny posterior variance; 1 and 2 in the middle.
        p.update(&[1, 2, 3], &[8, 7, 0], &[16, 16, 1000]).unwrap();
        let ids = [1, 2, 3];
        let v = p.expected_variance(&ids);
        let o = PoolAllocateOptions {
            skip_factor: Some(4.0),
            min_rollouts: Some(2),
            ..Default::default()
        };
        let direct = allocate::allocate(
            &v,
            32,
            0,
            24,
            Rule::Neyman,
            &Options {
                skip_factor: Some(4.0),
                min_rollouts: Some(2),
                ..Options::default()
            },
        )
        .unwrap();
        let pooled = p.allocate(&ids, 32, 0, 24, Rule::Neyman, &o).unwrap();
        assert_eq!(pooled, direct);
        assert_eq!(pooled, vec![16, 16, 0]);
        assert!(p.allocate(&ids, 32, 8, 24, Rule::Neyman, &o).is_err());
    }

    #[test]
    fn allocate_with_estimators() {
        let mut p = pool(1.0);
        p.update(&[1, 2, 3], &[8, 1, 0], &[16, 16, 40]).unwrap();
        let ids = [1, 2, 3, 4];
        let v = p.expected_variance(&ids);
        let rloo = PoolAllocateOptions {
            estimator: Some(Estimator::Rloo),
            ..Default::default()
        };
        let want = estimator::solve_shifted(&v, 40, 2, 16);
        assert_eq!(
            p.allocate(&ids, 40, 2, 16, Rule::Neyman, &rloo).unwrap(),
            want
        );
        // group_norm: the exact solver on the posteriors (calibration factors when calibrated).
        let gn = PoolAllocateOptions {
            estimator: Some(Estimator::GroupNorm),
            ..Default::default()
        };
        let (alpha, beta): (Vec<f64>, Vec<f64>) = ids.iter().map(|&i| p.posterior_of(i)).unzip();
        let out = p.allocate(&ids, 40, 2, 16, Rule::Neyman, &gn).unwrap();
        assert_eq!(
            out,
            estimator::solve_group_norm(&alpha, &beta, None, 40, 2, 16)
        );
        p.update(&[1, 2, 3], &[2, 8, 1], &[16, 16, 16]).unwrap();
        let factors: Vec<f64> = ids
            .iter()
            .map(|&i| {
                let (s, f) = p.evidence_of(i);
                p.calibration.factor(calibration::cell(s, f))
            })
            .collect();
        assert!(factors.iter().any(|&f| f != 1.0));
        let (alpha, beta): (Vec<f64>, Vec<f64>) = ids.iter().map(|&i| p.posterior_of(i)).unzip();
        let cal = PoolAllocateOptions {
            calibrated: Some(true),
            ..gn
        };
        assert_eq!(
            p.allocate(&ids, 40, 2, 16, Rule::Neyman, &cal).unwrap(),
            estimator::solve_group_norm(&alpha, &beta, Some(&factors), 40, 2, 16)
        );
        let err = |lo: i64, rule: Rule, o: &PoolAllocateOptions| {
            p.allocate(&ids, 40, lo, 16, rule, o)
                .unwrap_err()
                .to_string()
        };
        assert!(err(0, Rule::Neyman, &gn).contains("'group_norm' needs lo >= 2"));
        assert!(err(2, Rule::Proportional, &gn).contains("rule 'neyman' only"));
        let explore = PoolAllocateOptions {
            exploration: Some(true),
            ..rloo
        };
        assert!(err(2, Rule::Neyman, &explore).contains("cannot be combined with exploration"));
    }

    #[test]
    fn skip_price_skips_settled_prompts_exactly() {
        // ids 0, 1 settled (0/24), ids 2, 3 uncertain (12/24), 4 unseen.
        let mut p = PassRatePool::new(1.0, 1.0, 1.0, 0).unwrap();
        p.update(&[0, 1, 2, 3], &[0, 0, 12, 12], &[24, 24, 24, 24])
            .unwrap();
        let ids = [0, 1, 2, 3, 4];
        let o = PoolAllocateOptions {
            estimator: Some(Estimator::Rloo),
            min_rollouts: Some(2),
            skip_price: Some(4.0),
            ..Default::default()
        };
        let counts = p.allocate(&ids, 24, 0, 16, Rule::Neyman, &o).unwrap();
        // The DP's result on the pool's own variances and costs, and the settled ones skipped.
        let v = p.expected_variance(&ids);
        let c = p.skip_costs(&ids, 4.0, false, None).unwrap();
        assert_eq!(counts, crate::priced::solve(&v, &c, 24, 2, 16));
        assert_eq!((counts[0], counts[1]), (0, 0));
        assert!(
            counts[2] >= 6 && counts[3] >= 6 && counts[4] >= 6,
            "{counts:?}"
        );
        // c = κ·E[p²(1−p)²] of Beta(1, 25).
        let u = crate::priced::squared_variance_moment(1.0, 25.0);
        assert!((c[0] - 4.0 * u).abs() < 1e-15);
        // Exploration raises some settled prompts' costs over 64 steps' draws, never lowers one.
        let mut raised = 0;
        for seed in 0..64u64 {
            let e = p.skip_costs(&ids, 4.0, false, Some(seed)).unwrap();
            assert!(e.iter().zip(&c).all(|(x, y)| x >= y));
            raised += (e[0] > c[0]) as usize;
        }
        assert!(raised > 0);
        let err = |o: PoolAllocateOptions| {
            p.allocate(&ids, 24, 0, 16, Rule::Neyman, &o)
                .unwrap_err()
                .to_string()
        };
        assert!(err(PoolAllocateOptions {
            skip_price: Some(-1.0),
            ..o
        })
        .contains("skip_price must be finite"));
        assert!(err(PoolAllocateOptions {
            min_rollouts: None,
            ..o
        })
        .contains("min_rollouts >= 2"));
        assert!(err(PoolAllocateOptions {
            estimator: None,
            ..o
        })
        .ends_with("got rule 'neyman', estimator none, lo = 0, min_rollouts 2"));
        let gn = PoolAllocateOptions {
            estimator: Some(Estimator::GroupNorm),
            ..o
        };
        assert!(p
            .allocate(&ids, 24, 2, 16, Rule::Neyman, &gn)
            .unwrap_err()
            .to_string()
            .contains("group_norm"));
    }

    #[test]
    fn explore_seed_keeps_uncertain_prompts_from_being_skipped_for_ever() {
        let mut p = pool(1.0);
        // Prompts 1..=8 are informative (Beta(9, 9)); 100 has 59 failures (Beta(1, 60): v just
        // under the cut), 200 has 999: both are skipped without exploration.
        let ids: Vec<i64> = (1..=8).chain([100, 200]).collect();
        let k: Vec<i64> = (1..=8).map(|_| 8).chain([0, 0]).collect();
        let t: Vec<i64> = (1..=8).map(|_| 16).chain([59, 999]).collect();
        p.update(&ids, &k, &t).unwrap();
        let skip = PoolAllocateOptions {
            skip_factor: Some(4.0),
            ..Default::default()
        };
        let plain = p.allocate(&ids, 64, 0, 16, Rule::Neyman, &skip).unwrap();
        assert_eq!(&plain[8..], &[0, 0]);
        // With exploration, over many seeds each is kept with the probability that its
        // exploration draw (evidence capped at 16 trials on a uniform prior: Beta(1, 17) for
        // both, all their evidence being failures) reaches the cut: neither is skipped for ever.
        let (mut kept_uncertain, mut kept_confident) = (0, 0);
        for seed in 0..400u64 {
            let o = PoolAllocateOptions {
                explore_seed: Some(seed),
                ..skip
            };
            let out = p.allocate(&ids, 64, 0, 16, Rule::Neyman, &o).unwrap();
            assert_eq!(out.iter().sum::<i64>(), 64);
            kept_uncertain += (out[8] > 0) as usize;
            kept_confident += (out[9] > 0) as usize;
            // Deterministic: the same call gives the same result.
            assert_eq!(out, p.allocate(&ids, 64, 0, 16, Rule::Neyman, &o).unwrap());
        }
        // The cut is about 0.017 here: P(p̃(1−p̃) < 0.017) = 1 − (1 − 0.0173)^17 ≈ 0.26 for
        // Beta(1, 17), so each is kept in about 74% of the draws.
        for kept in [kept_uncertain, kept_confident] {
            assert!((240..=350).contains(&kept), "{kept}");
        }
        let bad = PoolAllocateOptions {
            explore_seed: Some(1),
            ..Default::default()
        };
        assert!(p
            .allocate(&ids, 64, 0, 16, Rule::Neyman, &bad)
            .unwrap_err()
            .to_string()
            .starts_with("explore_seed applies to the skipping rules only"));
    }

    #[test]
    fn calibration_learns_from_revisits() {
        let mut p = pool(1.0);
        // Nothing recorded yet: calibrated = plain.
        assert_eq!(p.calibrated_variance(&[1, 2]), p.expected_variance(&[1, 2]));
        // Step 1: ids 1 and 2 unseen (cell 0), prediction = prior variance 1/6 each; id 1 gets
        // 8/16 (fresh variance 8·8/(16·15)), id 2 gets 0/16 (0). Single-trial rows are ignored.
        p.update(&[1, 2, 3], &[8, 0, 1], &[16, 16, 1]).unwrap();
        let c = p.calibration();
        let observed = 16.0 * (64.0 / 240.0);
        assert!((c.observed[0] - observed).abs() < 1e-12);
        assert!((c.predicted[0] - 2.0 * 16.0 / 6.0).abs() < 1e-12);
        // An unseen id (cell 0) is scaled by that cell's factor.
        let factor = (observed + 2.0) / (2.0 * 16.0 / 6.0 + 2.0);
        let unseen = p.calibrated_variance(&[99])[0];
        assert!((unseen - factor / 6.0).abs() < 1e-12, "{unseen}");
        // Id 1 (evidence 8, 8: bin 5 on both axes, cell 5·13 + 5) has no data yet: factor 1.
        assert_eq!(p.calibrated_variance(&[1]), p.expected_variance(&[1]));
        // Step 2 decays the cells by 0.99 before adding.
        p.update(&[7], &[1], &[1]).unwrap();
        assert!((p.calibration().observed[0] - 0.99 * observed).abs() < 1e-12);
        // allocate(calibrated) uses the calibrated variances.
        let ids = [1, 2, 99];
        let o = PoolAllocateOptions {
            calibrated: Some(true),
            ..Default::default()
        };
        let direct = allocate::allocate(
            &p.calibrated_variance(&ids),
            48,
            8,
            24,
            Rule::Neyman,
            &Options::default(),
        )
        .unwrap();
        assert_eq!(
            p.allocate(&ids, 48, 8, 24, Rule::Neyman, &o).unwrap(),
            direct
        );
        assert!(p.allocate(&ids, 48, 8, 24, Rule::Uniform, &o).is_err());
    }

    fn rows<'a>(success: &'a [f64], failure: &'a [f64]) -> Option<NoiseRows<'a>> {
        Some(NoiseRows { success, failure })
    }

    #[test]
    fn noise_free_pool_has_unit_scale() {
        let mut p = pool(0.9);
        assert_eq!(p.noise_scale(&[1, 2]), vec![1.0, 1.0]);
        p.update(&[1, 2], &[3, 0], &[4, 4]).unwrap();
        assert_eq!(p.noise_scale(&[1, 2, 3]), vec![1.0; 3]);
        assert_eq!(p.noise_means(), [None, None]);
        assert_eq!(p.noise_sums(&[1]), (vec![0.0], vec![0.0]));
    }

    #[test]
    fn noise_scale_is_the_shrunk_class_mix() {
        let mut p = PassRatePool::new(1.0, 3.0, 1.0, 0).unwrap();
        // Id 1: 2 successes (q sum 1.0) and 2 failures (q sum 6.0); id 2: 0 of 4 (q sum 2.0).
        p.update_with_noise(&[1, 2], &[2, 0], &[4, 4], rows(&[1.0, 0.0], &[6.0, 2.0]))
            .unwrap();
        assert_eq!(
            p.noise_sums(&[1, 2, 3]),
            (vec![1.0, 0.0, 0.0], vec![6.0, 2.0, 0.0])
        );
        // Pool means: successes 1/2, failures 8/6.
        let (ms, mf) = (0.5, 8.0 / 6.0);
        assert_eq!(p.noise_means(), [Some(ms), Some(mf)]);
        let w0 = 1.0;
        let want = |sum_s: f64, n_s: f64, sum_f: f64, n_f: f64| {
            let q_s = if n_s > 0.0 {
                (sum_s + w0 * ms) / (n_s + w0)
            } else {
                ms
            };
            let q_f = if n_f > 0.0 {
                (sum_f + w0 * mf) / (n_f + w0)
            } else {
                mf
            };
            let m = (1.0 + n_s) / (4.0 + n_s + n_f);
            (1.0 - m) * q_s + m * q_f
        };
        let got = p.noise_scale(&[1, 2, 3]);
        assert_eq!(got[0], want(1.0, 2.0, 6.0, 2.0));
        assert_eq!(got[1], want(0.0, 0.0, 2.0, 4.0));
        // Unseen: exactly the pool-level value at the prior mean 1/4.
        assert_eq!(got[2], 0.75 * ms + 0.25 * mf);
        // w0 = 0: the raw class means where a class has rollouts.
        p.set_noise_weight(0.0).unwrap();
        let m1 = 3.0 / 8.0;
        assert_eq!(p.noise_scale(&[1])[0], (1.0 - m1) * 0.5 + m1 * 3.0);
        assert!(p.set_noise_weight(-1.0).is_err());
        assert!(p.set_noise_weight(f64::NAN).is_err());
        // A large w0 pulls every prompt to the pool-level class means.
        p.set_noise_weight(1e12).unwrap();
        let m2 = 1.0 / 8.0;
        let s2 = p.noise_scale(&[2])[0];
        assert!((s2 - ((1.0 - m2) * ms + m2 * mf)).abs() < 1e-9);
    }

    #[test]
    fn a_class_without_observations_borrows_the_other_class_mean() {
        let mut p = PassRatePool::new(1.0, 1.0, 1.0, 0).unwrap();
        // Only failures so far: the success class has not started.
        p.update_with_noise(&[1, 2], &[0, 0], &[2, 4], rows(&[0.0, 0.0], &[1.0, 5.0]))
            .unwrap();
        assert_eq!(p.noise_means(), [None, Some(1.0)]);
        let m = 1.0 / 4.0; // id 1: Beta(1, 3)
        let q_f = (1.0 + 1.0) / (2.0 + 1.0);
        assert_eq!(p.noise_scale(&[1])[0], (1.0 - m) * 1.0 + m * q_f);
        assert_eq!(p.noise_scale(&[9])[0], 1.0);
    }

    #[test]
    fn earlier_evidence_counts_at_the_first_mean_and_missing_steps_are_imputed() {
        let mut p = pool(1.0);
        p.update(&[1, 2], &[2, 1], &[3, 2]).unwrap(); // before any noise: (2, 1) and (1, 1)
                                                      // First noise step: successes average q = 4, failures q = 1 (ids 2 and 3).
        p.update_with_noise(&[2, 3], &[1, 1], &[2, 2], rows(&[4.0, 4.0], &[1.0, 1.0]))
            .unwrap();
        // Id 1's earlier evidence is counted at those means; id 2 gets them plus its rows.
        assert_eq!(
            p.noise_sums(&[1, 2, 3]),
            (vec![8.0, 8.0, 4.0], vec![1.0, 2.0, 1.0])
        );
        assert_eq!(p.noise_means(), [Some(4.0), Some(1.0)]);
        // A step without noise data: q imputed at the pool means, so they do not move.
        p.update(&[1], &[1], &[3]).unwrap();
        assert_eq!(p.noise_sums(&[1]), (vec![12.0], vec![3.0]));
        assert_eq!(p.noise_means(), [Some(4.0), Some(1.0)]);
        // A new observation moves them: 3 successes with q = 0 (ids 1 and 3).
        p.update_with_noise(&[1, 3], &[2, 1], &[2, 1], rows(&[0.0, 0.0], &[0.0, 0.0]))
            .unwrap();
        let t = p.noise_totals();
        // Successes: 20 over 5 rollouts, 4 imputed for 1, then 0 over 3.
        assert_eq!((t.sum[0], t.count[0]), (20.0 + 4.0, 5.0 + 1.0 + 3.0));
        assert_eq!(p.noise_means()[0], Some(24.0 / 9.0));
    }

    #[test]
    fn noise_sums_forget_like_the_evidence() {
        let mut p = pool(0.5);
        p.update_with_noise(&[1], &[2], &[4], rows(&[8.0], &[2.0]))
            .unwrap();
        p.update_with_noise(&[2], &[1], &[1], rows(&[1.0], &[0.0]))
            .unwrap();
        p.update(&[], &[], &[]).unwrap();
        assert_eq!(p.noise_sums(&[1, 2]), (vec![2.0, 0.5], vec![0.5, 0.0]));
        assert_eq!(p.evidence(&[1]), (vec![0.5], vec![0.5]));
        // The pool means are ratios of equally forgotten sums: (8·¼ + 1·½) / (2·¼ + 1·½).
        assert_eq!(p.noise_means(), [Some(2.5), Some(1.0)]);
        let (s, f) = (p.noise_totals().sum[0], p.noise_totals().count[0]);
        assert_eq!((s * p.scale(), f * p.scale()), (2.5, 1.0));
    }

    #[test]
    fn noise_statistics_survive_renormalisation() {
        let mut p = pool(0.5);
        let mut want = (0.0f64, 0.0f64);
        for step in 0..200 {
            p.update_with_noise(
                &[-42, step],
                &[1, 1],
                &[3, 1],
                rows(&[0.5, 0.25], &[3.0, 0.0]),
            )
            .unwrap();
            want = (want.0 * 0.5 + 0.5, want.1 * 0.5 + 3.0);
            assert!(p.scale() >= SCALE_FLOOR);
        }
        let (s, f) = p.noise_sums(&[-42]);
        assert!((s[0] - want.0).abs() < 1e-5 && (f[0] - want.1).abs() < 1e-5);
        // Pool means: successes (0.5 + 0.25) per 2 rollouts each step, failures 3 per 2.
        let [ms, mf] = p.noise_means();
        assert!((ms.unwrap() - 0.375).abs() < 1e-9 && (mf.unwrap() - 1.5).abs() < 1e-9);
    }

    #[test]
    fn noise_rows_are_checked_before_anything_changes() {
        let mut p = pool(0.5);
        p.update_with_noise(&[1, 2], &[1, 1], &[2, 2], rows(&[1.0, 1.0], &[1.0, 1.0]))
            .unwrap();
        let before = (
            p.evidence(&[1, 2]),
            p.noise_sums(&[1, 2]),
            p.noise_totals().clone(),
            p.scale(),
            p.updates(),
        );
        let err = |p: &mut PassRatePool, qs: &[f64], qf: &[f64], k: &[i64], t: &[i64]| {
            p.update_with_noise(&[1, 2], k, t, rows(qs, qf))
                .unwrap_err()
                .to_string()
        };
        let (k, t) = ([1i64, 0], [2i64, 2]);
        assert_eq!(
            err(&mut p, &[1.0], &[1.0, 1.0], &k, &t),
            "noise_success has length 1 but prompt_ids has length 2"
        );
        assert_eq!(
            err(&mut p, &[1.0, 0.0], &[1.0, f64::NAN], &k, &t),
            "noise_failure[1] is NaN"
        );
        assert_eq!(
            err(&mut p, &[-0.5, 0.0], &[1.0, 1.0], &k, &t),
            "noise_success[0] is negative (-0.5)"
        );
        assert_eq!(
            err(&mut p, &[1.0, f64::INFINITY], &[1.0, 1.0], &k, &t),
            "noise_success[1] is infinite (inf)"
        );
        assert_eq!(
            err(&mut p, &[1.0, 0.25], &[1.0, 1.0], &k, &t),
            "noise_success[1] = 0.25 but successes[1] = 0 (a class without rollouts has no \
             noise sum)"
        );
        assert_eq!(
            err(&mut p, &[1.0, 0.0], &[1.0, 1.0], &[1, 2], &t),
            "noise_failure[1] = 1.0 but trials[1] - successes[1] = 0 (a class without \
             rollouts has no noise sum)"
        );
        assert!(err(&mut p, &[1e31, 0.0], &[1.0, 1.0], &k, &t).contains("is above 1e30"));
        // Count errors are reported first.
        assert_eq!(
            err(&mut p, &[f64::NAN, 0.0], &[1.0, 1.0], &[3, 0], &t),
            "successes[0] = 3 exceeds trials[0] = 2"
        );
        let after = (
            p.evidence(&[1, 2]),
            p.noise_sums(&[1, 2]),
            p.noise_totals().clone(),
            p.scale(),
            p.updates(),
        );
        assert_eq!(after, before);
    }

    #[test]
    fn pool_totals_equal_a_scan_of_the_entries() {
        // Random steps with and without noise, forgetting, growth and renormalisation.
        let mut rng = Rng::new(77);
        let mut p = PassRatePool::new(0.5, 0.5, 0.3, 0).unwrap();
        for step in 0..120 {
            let n = 1 + rng.below(300) as usize;
            let ids: Vec<i64> = (0..n).map(|_| rng.below(2000) as i64 - 1000).collect();
            let t: Vec<i64> = (0..n).map(|_| rng.below(9) as i64).collect();
            let k: Vec<i64> = t.iter().map(|&x| rng.below(x as u64 + 1) as i64).collect();
            let qs: Vec<f64> = k.iter().map(|&x| x as f64 * rng.unit() * 3.0).collect();
            let qf: Vec<f64> = (0..n).map(|j| (t[j] - k[j]) as f64 * rng.unit()).collect();
            let noise = (step % 3 != 0).then_some(NoiseRows {
                success: &qs,
                failure: &qf,
            });
            p.update_with_noise(&ids, &k, &t, noise).unwrap();
        }
        let t = p.noise_totals().clone();
        assert_eq!(t.started, [true, true]);
        let scan = p.table.entries().fold([0.0f64; 4], |a, e| {
            [
                a[0] + e.noise_success as f64,
                a[1] + e.noise_failure as f64,
                a[2] + e.successes as f64,
                a[3] + e.failures as f64,
            ]
        });
        for (kept, scanned) in [t.sum[0], t.sum[1], t.count[0], t.count[1]]
            .iter()
            .zip(scan)
        {
            assert!((kept / scanned - 1.0).abs() < 1e-5, "{kept} vs {scanned}");
        }
    }

    #[test]
    fn allocate_with_a_scale() {
        let mut p = pool(1.0);
        p.update_with_noise(
            &[1, 2, 3],
            &[8, 1, 3],
            &[16, 16, 4],
            rows(&[4.0, 9.0, 0.3], &[16.0, 3.0, 0.5]),
        )
        .unwrap();
        let ids = [1, 2, 3, 4];
        let v = p.expected_variance(&ids);
        let s = p.noise_scale(&ids);
        assert!(s.iter().all(|&x| x > 0.0) && s[0] != s[1]);
        let own = PoolAllocateOptions {
            noise_scale: Some(true),
            ..Default::default()
        };
        let explicit = PoolAllocateOptions {
            scale: Some(&s),
            ..Default::default()
        };
        let direct = |o: Options| allocate::allocate(&v, 40, 2, 16, Rule::Neyman, &o).unwrap();
        let want = direct(Options {
            scale: Some(&s),
            ..Options::default()
        });
        assert_ne!(want, direct(Options::default()));
        assert_eq!(
            p.allocate(&ids, 40, 2, 16, Rule::Neyman, &own).unwrap(),
            want
        );
        assert_eq!(
            p.allocate(&ids, 40, 2, 16, Rule::Neyman, &explicit)
                .unwrap(),
            want
        );
        // group_norm: the scale multiplies each prompt's cost (with the calibration factors).
        let (alpha, beta): (Vec<f64>, Vec<f64>) = ids.iter().map(|&i| p.posterior_of(i)).unzip();
        let gn = PoolAllocateOptions {
            estimator: Some(Estimator::GroupNorm),
            ..own
        };
        assert_eq!(
            p.allocate(&ids, 40, 2, 16, Rule::Neyman, &gn).unwrap(),
            estimator::solve_group_norm(&alpha, &beta, Some(&s), 40, 2, 16)
        );
        p.update(&[1, 2, 3], &[2, 8, 1], &[16, 16, 16]).unwrap();
        let s = p.noise_scale(&ids);
        let (alpha, beta): (Vec<f64>, Vec<f64>) = ids.iter().map(|&i| p.posterior_of(i)).unzip();
        let both: Vec<f64> = ids
            .iter()
            .zip(&s)
            .map(|(&i, &x)| {
                let (a, b) = p.evidence_of(i);
                p.calibration.factor(calibration::cell(a, b)) * x
            })
            .collect();
        let cal = PoolAllocateOptions {
            calibrated: Some(true),
            ..gn
        };
        assert_eq!(
            p.allocate(&ids, 40, 2, 16, Rule::Neyman, &cal).unwrap(),
            estimator::solve_group_norm(&alpha, &beta, Some(&both), 40, 2, 16)
        );
        let err = |o: &PoolAllocateOptions, rule: Rule| {
            p.allocate(&ids, 40, 2, 16, rule, o)
                .unwrap_err()
                .to_string()
        };
        let both = PoolAllocateOptions {
            scale: Some(&s),
            ..own
        };
        assert!(err(&both, Rule::Neyman).starts_with("scale and noise_scale cannot be combined"));
        assert_eq!(
            err(&own, Rule::Uniform),
            "noise_scale does not apply to rule 'uniform' (it weighs each prompt's variance by \
             its noise scale: only rules 'neyman' and 'proportional' weigh prompts by variance)"
        );
        let short = [1.0];
        let bad = PoolAllocateOptions {
            scale: Some(&short),
            ..Default::default()
        };
        assert_eq!(
            err(&bad, Rule::Neyman),
            "scale has length 1 but prompt_ids has length 4"
        );
        let zero = [1.0, 0.0, 1.0, 1.0];
        let bad = PoolAllocateOptions {
            scale: Some(&zero),
            estimator: Some(Estimator::GroupNorm),
            ..Default::default()
        };
        assert_eq!(
            err(&bad, Rule::Neyman),
            "scale[1] is zero (0.0); a scale must be > 0"
        );
    }

    #[test]
    fn a_noise_free_pool_allocates_exactly_as_without_a_scale() {
        let mut p = pool(0.8);
        p.update(&[1, 2, 3], &[8, 1, 0], &[16, 16, 40]).unwrap();
        let ids = [1, 2, 3, 4, 5];
        for (lo, hi, e) in [
            (0, 30, None),
            (2, 30, Some(Estimator::Rloo)),
            (2, 30, Some(Estimator::GroupNorm)),
        ] {
            let plain = PoolAllocateOptions {
                estimator: e,
                ..Default::default()
            };
            let own = PoolAllocateOptions {
                noise_scale: Some(true),
                ..plain
            };
            assert_eq!(
                p.allocate(&ids, 50, lo, hi, Rule::Neyman, &own).unwrap(),
                p.allocate(&ids, 50, lo, hi, Rule::Neyman, &plain).unwrap()
            );
        }
    }

    #[test]
    fn all_zero_noise_observations_are_refused_by_noise_scale() {
        let mut p = pool(1.0);
        p.update_with_noise(&[1], &[1], &[2], rows(&[0.0], &[0.0]))
            .unwrap();
        assert_eq!(p.noise_scale(&[1, 2]), vec![0.0, 0.0]);
        let own = PoolAllocateOptions {
            noise_scale: Some(true),
            ..Default::default()
        };
        let err = p
            .allocate(&[1, 2], 8, 2, 6, Rule::Neyman, &own)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "noise_scale=True: the pool's noise scale of prompt_ids[0] (id 1) is 0.0"
            ),
            "{err}"
        );
    }

    #[test]
    fn fit_prior_ignores_the_noise_statistics() {
        let mut a = pool(1.0);
        let mut b = pool(1.0);
        let ids: Vec<i64> = (0..200).collect();
        let t = vec![10i64; 200];
        let k: Vec<i64> = ids.iter().map(|&i| (i * 7) % 11).collect();
        let qs: Vec<f64> = k.iter().map(|&x| x as f64 * 2.0).collect();
        let qf: Vec<f64> = k.iter().map(|&x| (10 - x) as f64).collect();
        a.update(&ids, &k, &t).unwrap();
        b.update_with_noise(&ids, &k, &t, rows(&qs, &qf)).unwrap();
        assert_eq!(a.fit_prior().unwrap(), b.fit_prior().unwrap());
        assert_eq!(b.noise_means(), [Some(2.0), Some(1.0)]);
    }

    #[test]
    fn exact_sum_is_exact_and_rounds_once() {
        let sum = |xs: &[f32]| {
            let mut e = ExactSum::default();
            xs.iter().for_each(|&x| e.add(x));
            e
        };
        let two = |k: i32| 2f32.powi(k);
        assert_eq!(ExactSum::default().to_f64(), 0.0);
        // A float sum loses the 1 (1e30 + 1 - 1e30 = 0); the exact one keeps it.
        let mut e = sum(&[1e30, 1.0]);
        e.sub(1e30);
        assert_eq!(e.to_f64(), 1.0);
        assert_eq!(e, sum(&[1.0]));
        // Extremes: the smallest subnormal and the largest f32, alone and together.
        let tiny = f32::from_bits(1);
        assert_eq!(sum(&[tiny]).to_f64(), 2f64.powi(-149));
        assert_eq!(sum(&[f32::MAX; 4]).to_f64(), 4.0 * f32::MAX as f64);
        assert_eq!(sum(&[f32::MAX, tiny]).to_f64(), f32::MAX as f64);
        // One rounding to nearest, ties to even: 1 + 2^-53 is a tie (down to 1), anything
        // beyond it, however far below (2^-149), rounds up; 1 + 3·2^-53 ties up to even.
        assert_eq!(sum(&[1.0, two(-53)]).to_f64(), 1.0);
        assert_eq!(sum(&[1.0, two(-53), tiny]).to_f64(), 1.0 + 2f64.powi(-52));
        assert_eq!(
            sum(&[1.0, two(-52), two(-53)]).to_f64(),
            1.0 + 2f64.powi(-51)
        );
        assert_eq!(sum(&[1.0, two(-60)]).to_f64(), 1.0);
        // A carry across a 64-bit limb: 2^63-weighted parts (limb boundary at 2^-85, 2^-21, ...).
        let mut e = sum(&[two(-86); 2]);
        assert_eq!(e.to_f64(), 2f64.powi(-85));
        e.sub(two(-86));
        assert_eq!(e.to_f64(), 2f64.powi(-86));
        // -0.0 adds nothing.
        assert_eq!(sum(&[-0.0, 0.0]), ExactSum::default());
    }

    #[test]
    fn exact_sum_is_independent_of_order() {
        let mut rng = Rng::new(5);
        // Multiples of 2^-16 below 2^20: every f64 partial sum is exact, so it is the reference.
        let xs: Vec<f32> = (0..5000)
            .map(|_| (rng.below(1 << 36) as f64 / 65536.0) as f32)
            .collect();
        let mut forward = ExactSum::default();
        xs.iter().for_each(|&x| forward.add(x));
        let reference: f64 = xs.iter().map(|&x| x as f64).sum();
        assert_eq!(forward.to_f64(), reference);
        // Any values (1e-40 .. 1e35): the same multiset in another order, with some added and
        // removed again on the way, gives the same bits.
        let ys: Vec<f32> = (0..5000)
            .map(|_| (rng.unit() * 10f64.powf(75.0 * rng.unit() - 40.0)) as f32)
            .collect();
        let mut a = ExactSum::default();
        ys.iter().for_each(|&y| a.add(y));
        let mut b = ExactSum::default();
        for (j, &y) in ys.iter().enumerate().rev() {
            b.add(y);
            b.add(ys[j / 2]);
            b.sub(ys[j / 2]);
        }
        assert_eq!(a, b);
        ys.iter().for_each(|&y| b.sub(y));
        assert_eq!(b, ExactSum::default());
    }

    #[test]
    fn stats_totals_are_kept_exactly_without_a_scan() {
        // Forgetting (with renormalisations), growth, repeated ids, noise steps, the marker id.
        let mut rng = Rng::new(31);
        let mut p = PassRatePool::new(0.5, 0.5, 0.7, 0).unwrap();
        for step in 0..150 {
            let n = 1 + rng.below(200) as usize;
            let mut ids: Vec<i64> = (0..n).map(|_| rng.below(3000) as i64 - 1500).collect();
            if step % 7 == 0 {
                ids[0] = i64::MIN;
            }
            let t: Vec<i64> = (0..n).map(|_| rng.below(9) as i64).collect();
            let k: Vec<i64> = t.iter().map(|&x| rng.below(x as u64 + 1) as i64).collect();
            let qs: Vec<f64> = k.iter().map(|&x| x as f64 * 0.5).collect();
            let qf: Vec<f64> = (0..n).map(|j| (t[j] - k[j]) as f64).collect();
            let noise = (step % 2 == 0).then_some(NoiseRows {
                success: &qs,
                failure: &qf,
            });
            p.update_with_noise(&ids, &k, &t, noise).unwrap();
            assert_eq!(p.evidence, p.scan_evidence(), "step {step}");
        }
        assert!(p.contains(i64::MIN) && p.updates() == 150);
        let st = p.stats();
        let [s, f] = p.scan_evidence().map(|x| x.to_f64() * p.scale());
        assert_eq!((st.successes, st.failures), (s, f));
        // A reloaded pool reports the same totals (they do not depend on insertion order).
        let q = crate::storage::from_bytes(&crate::storage::to_bytes(&p)).unwrap();
        assert_eq!(q.evidence, p.evidence);
        assert_eq!(q.stats(), st);
        // Integer evidence without forgetting: the totals are the counts themselves.
        let mut p = pool(1.0);
        p.update(&[1, 2, 1], &[3, 0, 2], &[4, 16, 2]).unwrap();
        assert_eq!((p.stats().successes, p.stats().failures), (5.0, 17.0));
    }

    #[test]
    fn a_loaded_pool_keeps_the_saved_table_size() {
        for n in [0usize, 1, 13, 24, 25, 1000, 5000] {
            let mut p = pool(1.0);
            let ids: Vec<i64> = (0..n as i64).collect();
            let ones = vec![1i64; n];
            p.update(&ids, &ones, &ones).unwrap();
            let q = crate::storage::from_bytes(&crate::storage::to_bytes(&p)).unwrap();
            assert_eq!(q.slots(), p.slots(), "{n} prompts");
        }
    }

    /// Pools whose table has a cluster wrapping past its last slot (slot 0 holds an entry whose
    /// home is elsewhere): the case plain table order does not rebuild.
    fn wrapped_pool(seed: u64) -> Option<PassRatePool> {
        let mut rng = Rng::new(seed);
        let mut p = pool(0.9);
        for _ in 0..12 {
            let ids: Vec<i64> = (0..150).map(|_| rng.below(4000) as i64).collect();
            let t: Vec<i64> = (0..150).map(|_| 1 + rng.below(8) as i64).collect();
            let k: Vec<i64> = t.iter().map(|&t| rng.below(t as u64 + 1) as i64).collect();
            p.update(&ids, &k, &t).unwrap();
        }
        let first = p.table.slots[0];
        (first.id != EMPTY && p.table.home(first.id) != 0).then_some(p)
    }

    #[test]
    fn a_reloaded_pool_keeps_its_layout_bytes_and_continuation() {
        let pools: Vec<PassRatePool> = (0..200).filter_map(wrapped_pool).take(3).collect();
        assert_eq!(pools.len(), 3, "no seed gave a wrapped cluster");
        for mut p in pools {
            let bytes = crate::storage::to_bytes(&p);
            let mut q = crate::storage::from_bytes(&bytes).unwrap();
            let ids = |p: &PassRatePool| p.table.slots.iter().map(|s| s.id).collect::<Vec<_>>();
            assert_eq!(ids(&q), ids(&p), "same slot for every prompt");
            assert_eq!(crate::storage::to_bytes(&q), bytes);
            // The same updates (new prompts, a growth of the table) keep both identical.
            let new: Vec<i64> = (4000..7000).collect();
            let ones = vec![1i64; new.len()];
            p.update(&new, &ones, &ones).unwrap();
            q.update(&new, &ones, &ones).unwrap();
            assert!(p.slots() > q.slots() / 2 && ids(&q) == ids(&p));
            assert_eq!(crate::storage::to_bytes(&q), crate::storage::to_bytes(&p));
        }
    }
}
