//! Beta pass-rate posteriors for a pool of prompts keyed by int64 id.
//!
//! Each prompt has a Beta(α0 + s, β0 + f) posterior where (s, f) is the (forgotten) evidence above
//! the prior. Evidence, not α/β, is stored, so the prior can be changed or fitted later.
//!
//! Forgetting: every `update` call is one training step. It multiplies all stored evidence by ρ,
//! then adds the step's counts. To make that O(batch), the table stores evidence divided by a
//! global scale g (actual = stored · g): a step does g ← g·ρ and adds k/g. When g falls below
//! `SCALE_FLOOR`, one O(pool) pass folds g into the entries and resets it to 1.
//!
//! Memory: open addressing with linear probing over one array of 16-byte slots (id i64,
//! successes f32, failures f32), load factor kept in [0.53, 0.8], i.e. 20–30 bytes per prompt.
//! `i64::MIN` marks an empty slot; the prompt whose id is `i64::MIN` is kept beside the table.

use crate::allocate::{self, Options, Rule};
use crate::calibration::{self, Calibration, Observation};
use crate::error::{Error, Result};
use crate::estimator::{self, Estimator, Objective};
use crate::parallel::map_chunks;

/// Below this global scale the stored evidence is renormalised (keeps f32 entries finite).
pub const SCALE_FLOOR: f64 = 1e-18;
/// Largest fraction of occupied slots before the table grows (by half).
const MAX_LOAD: f64 = 0.8;
const MIN_SLOTS: usize = 16;
const EMPTY: i64 = i64::MIN;

/// One table slot; `successes`/`failures` are stored evidence (actual evidence / scale).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Slot {
    pub id: i64,
    pub successes: f32,
    pub failures: f32,
}

const EMPTY_SLOT: Slot = Slot {
    id: EMPTY,
    successes: 0.0,
    failures: 0.0,
};

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
    /// Evidence of the prompt whose id equals the empty marker.
    min_id: Option<(f32, f32)>,
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

    fn get(&self, id: i64) -> Option<(f32, f32)> {
        if id == EMPTY {
            return self.min_id;
        }
        match self.probe(id) {
            (s, true) => Some((self.slots[s].successes, self.slots[s].failures)),
            _ => None,
        }
    }

    /// Makes room for `additional` new prompts without growing during the next inserts.
    fn reserve(&mut self, additional: usize) {
        let needed = self.occupied + additional;
        if needed as f64 > MAX_LOAD * self.slots.len() as f64 {
            let by_half = self.slots.len() + self.slots.len() / 2;
            let by_need = (needed as f64 / MAX_LOAD).ceil() as usize + 1;
            self.rehash(by_half.max(by_need));
        }
    }

    fn rehash(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY_SLOT; slots]);
        for slot in old.into_iter().filter(|s| s.id != EMPTY) {
            let (s, _) = self.probe(slot.id);
            self.slots[s] = slot;
        }
    }

    /// Evidence cell of `id`, inserted with zero evidence if absent (capacity must be reserved).
    #[inline]
    fn entry(&mut self, id: i64) -> (&mut f32, &mut f32) {
        if id == EMPTY {
            let e = self.min_id.get_or_insert((0.0, 0.0));
            return (&mut e.0, &mut e.1);
        }
        let (s, found) = self.probe(id);
        if !found {
            debug_assert!((self.occupied + 1) as f64 <= MAX_LOAD * self.slots.len() as f64 + 1.0);
            self.slots[s].id = id;
            self.occupied += 1;
        }
        let slot = &mut self.slots[s];
        (&mut slot.successes, &mut slot.failures)
    }

    /// Inserts an entry unless its id is present (then returns false).
    fn insert_new(&mut self, slot: Slot) -> bool {
        if slot.id == EMPTY {
            let fresh = self.min_id.is_none();
            if fresh {
                self.min_id = Some((slot.successes, slot.failures));
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
            .chain(self.min_id.map(|(successes, failures)| Slot {
                id: EMPTY,
                successes,
                failures,
            }))
    }

    fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + std::mem::size_of::<Table>()
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
}

/// Switches of [`PassRatePool::allocate`]; `None` picks the rule's default (on for
/// "proportional", off otherwise).
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolAllocateOptions {
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
    /// sized for `capacity` prompts without growing.
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

    /// One training step: forget (multiply all evidence by ρ), then add the counts. Entries with
    /// zero trials add nothing and create no entry; repeated ids add up. Everything is checked
    /// before anything changes.
    pub fn update(&mut self, ids: &[i64], successes: &[i64], trials: &[i64]) -> Result<()> {
        check_counts(ids, successes, trials)?;
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
        self.table.reserve(ids.len());
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
            if !self.add(ids[j], s, f) {
                // Stored values would overflow f32: fold the scale in and add again.
                self.renormalise();
                let added = self.add(ids[j], s, f);
                debug_assert!(added);
            }
        }
        Ok(())
    }

    /// Adds actual evidence (s, f); false (and nothing changed) if a stored value would overflow.
    #[inline]
    fn add(&mut self, id: i64, s: f64, f: f64) -> bool {
        let inv = 1.0 / self.scale;
        let (ps, pf) = self.table.entry(id);
        let (ns, nf) = ((*ps as f64 + s * inv) as f32, (*pf as f64 + f * inv) as f32);
        if !(ns.is_finite() && nf.is_finite()) {
            return false;
        }
        (*ps, *pf) = (ns, nf);
        true
    }

    /// Folds the global scale into every entry (O(pool)), leaving the scale at 1.
    pub fn renormalise(&mut self) {
        let g = self.scale;
        for slot in self.table.slots.iter_mut().filter(|s| s.id != EMPTY) {
            slot.successes = (slot.successes as f64 * g) as f32;
            slot.failures = (slot.failures as f64 * g) as f32;
        }
        if let Some((s, f)) = self.table.min_id.as_mut() {
            *s = (*s as f64 * g) as f32;
            *f = (*f as f64 * g) as f32;
        }
        self.scale = 1.0;
    }

    /// Forgotten evidence (successes, failures) above the prior; (0, 0) for unseen ids.
    #[inline]
    pub fn evidence_of(&self, id: i64) -> (f64, f64) {
        match self.table.get(id) {
            Some((s, f)) => (s as f64 * self.scale, f as f64 * self.scale),
            None => (0.0, 0.0),
        }
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
        let reference = rule == Rule::Proportional;
        let exploration = o.exploration.unwrap_or(reference);
        let mastery = o.mastery.unwrap_or(reference);
        if rule == Rule::Uniform {
            let given = [
                ("exploration", o.exploration == Some(true)),
                ("mastery", o.mastery == Some(true)),
                ("exploration_rollouts", o.exploration_rollouts.is_some()),
                ("mastery_threshold", o.mastery_threshold.is_some()),
                ("priority_floor", o.priority_floor.is_some()),
                ("calibrated", o.calibrated == Some(true)),
            ];
            if let Some((name, _)) = given.iter().find(|(_, g)| *g) {
                return Err(Error::invalid(format!(
                    "{name} does not apply to rule 'uniform' (it takes no options)"
                )));
            }
        }
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
        if let Some(e) = o.estimator {
            if rule != Rule::Neyman {
                return Err(Error::invalid(format!(
                    "estimator applies to rule 'neyman' only, got rule '{}' with estimator '{}'",
                    rule.name(),
                    e.name()
                )));
            }
            for (name, on) in [("exploration", exploration), ("mastery", mastery)] {
                if on {
                    return Err(Error::invalid(format!(
                        "estimator '{}' cannot be combined with {name} (the reference's \
                         exploration and mastery options)",
                        e.name()
                    )));
                }
            }
        }
        allocate::check_bounds(ids.len(), budget, lo, hi)?;
        let calibrated = o.calibrated == Some(true);
        let skipping = o.skip_factor.is_some_and(|f| f > 0.0);
        if o.explore_seed.is_some() && !skipping {
            return Err(Error::invalid(format!(
                "explore_seed applies to the skipping rule only (skip_factor > 0), got \
                 skip_factor = {:?}",
                o.skip_factor
            )));
        }
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
            // One lookup per id: posterior (α, β) and, when calibrated, the cell's factor.
            let looked_up = self.map_ids(ids, |p, id| {
                let (s, f) = p.evidence_of(id);
                let factor = if calibrated {
                    p.calibration.factor(calibration::cell(s, f))
                } else {
                    1.0
                };
                (p.alpha0 + s, p.beta0 + f, factor)
            });
            let alpha: Vec<f64> = looked_up.iter().map(|x| x.0).collect();
            let beta: Vec<f64> = looked_up.iter().map(|x| x.1).collect();
            let scale = calibrated.then(|| looked_up.iter().map(|x| x.2).collect::<Vec<f64>>());
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
        let variances = if calibrated {
            self.calibrated_variance(ids)
        } else {
            self.expected_variance(ids)
        };
        // Skipping on calibrated variances: a prompt is skipped only if its plain posterior
        // variance is below the cut too. (A skipped prompt gets no revisit, so a calibration
        // factor that is too low could not correct itself.)
        let mut guard = (calibrated && skipping).then(|| self.expected_variance(ids));
        // Exploration: the exploration draw's variance joins the guard (skipped only if it is
        // below the cut too).
        if let Some(seed) = o.explore_seed {
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
        };
        allocate::allocate_guarded(&variances, guard.as_deref(), budget, lo, hi, rule, &options)
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

    pub fn stats(&self) -> Stats {
        let (s, f) = self.table.entries().fold((0.0f64, 0.0f64), |(s, f), e| {
            (s + e.successes as f64, f + e.failures as f64)
        });
        Stats {
            prompts: self.len(),
            slots: self.table.slots.len(),
            bytes: self.table.bytes() + std::mem::size_of::<Self>(),
            updates: self.updates,
            scale: self.scale,
            successes: s * self.scale,
            failures: f * self.scale,
        }
    }

    /// All ids, in storage order.
    pub fn ids(&self) -> Vec<i64> {
        self.table.entries().map(|e| e.id).collect()
    }

    /// Stored entries (evidence divided by the scale), in storage order; used by the file format.
    pub fn stored_entries(&self) -> impl Iterator<Item = Slot> + '_ {
        self.table.entries()
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
        // Same table size as when saved: re-inserting in saved (table) order stays cache-friendly.
        if slots > table.slots.len() && slots <= 4 * table.slots.len() {
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
        })
    }

    /// Inserts one stored entry; false if the id is already present.
    pub fn insert_stored(&mut self, slot: Slot) -> bool {
        self.table.insert_new(slot)
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
        for chunk in ids.chunks(512) {
            let ones = vec![1i64; chunk.len()];
            p.update(chunk, &ones, &ones).unwrap();
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(p.len(), unique.len());
        assert!(ids.iter().all(|&id| p.contains(id)));
        let load = (p.len() - 1) as f64 / p.slots() as f64;
        assert!(load <= MAX_LOAD && load > 0.3, "load {load}");
        let bytes_per_prompt = p.stats().bytes as f64 / p.len() as f64;
        assert!(bytes_per_prompt <= 32.0, "{bytes_per_prompt}");
        assert_eq!(p.evidence(&[i64::MIN]).0, vec![1.0]);
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
            .starts_with("explore_seed applies to the skipping rule only"));
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
}
