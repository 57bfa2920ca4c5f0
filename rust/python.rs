//! The PyO3 binding: converts Python arguments to slices, releases the GIL around heavy work,
//! converts results to NumPy arrays and the core's `Error` to Python exceptions (in `to_py_err`).
//! No algorithm lives here.

use crate::allocate::{self, Options, Rule};
use crate::error::Error;
use crate::estimator::Estimator;
use crate::pool::{NoiseRows, PassRatePool, PoolAllocateOptions};
use crate::rules;
use crate::storage;
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::path::PathBuf;

type Float64Array<'py> = Bound<'py, PyArray1<f64>>;

/// Inputs at least this long are processed with the GIL released. Shorter calls finish in
/// microseconds; releasing would only invite a GIL hand-off that costs more.
const DETACH_MIN_LEN: usize = 1 << 14;

/// The one place where core errors become Python exceptions: bad arguments and bad files are
/// `ValueError`; operating-system failures are `OSError`, built from the errno so that Python
/// picks the matching subclass (`FileNotFoundError`, `PermissionError`, ...).
fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidArgument(_) | Error::BadFile { .. } => PyValueError::new_err(e.to_string()),
        Error::Io {
            ref path,
            action,
            ref source,
        } => {
            let filename = path.to_string_lossy().into_owned();
            match source.raw_os_error() {
                Some(errno) => {
                    let text = source.to_string();
                    let reason = text.split(" (os error").next().unwrap_or(&text);
                    PyOSError::new_err((errno, format!("cannot {action} file: {reason}"), filename))
                }
                None => PyOSError::new_err(e.to_string()),
            }
        }
    }
}

/// A float64 view of a 1-D array-like: borrowed when it already is a contiguous float64 array.
enum Floats<'py> {
    Borrowed(PyReadonlyArray1<'py, f64>),
    Owned(Vec<f64>),
}

impl Floats<'_> {
    fn as_slice(&self) -> &[f64] {
        match self {
            Floats::Borrowed(a) => a.as_slice().expect("checked contiguous"),
            Floats::Owned(v) => v,
        }
    }
}

enum Ints<'py> {
    Borrowed(PyReadonlyArray1<'py, i64>),
    Owned(Vec<i64>),
}

impl Ints<'_> {
    fn as_slice(&self) -> &[i64] {
        match self {
            Ints::Borrowed(a) => a.as_slice().expect("checked contiguous"),
            Ints::Owned(v) => v,
        }
    }
}

fn shape_text(arr: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(arr.getattr("shape")?.repr()?.to_string())
}

/// `numpy.asarray(obj)` checked to be 1-D; returns it with its dtype kind character.
fn as_1d_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<(Bound<'py, PyAny>, char)> {
    let np = obj.py().import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|e| {
        PyValueError::new_err(format!("{name} must be a 1-D array: {}", e.value(obj.py())))
    })?;
    let ndim: usize = arr.getattr("ndim")?.extract()?;
    if ndim != 1 {
        return Err(PyValueError::new_err(format!(
            "{name} must be 1-D, got an array of shape {}",
            shape_text(&arr)?
        )));
    }
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    Ok((arr, kind.chars().next().unwrap_or('?')))
}

fn dtype_text(arr: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(arr.getattr("dtype")?.str()?.to_string())
}

/// Any 1-D real array-like (float64 zero-copy; float32, integers and strided arrays converted).
fn float_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Floats<'py>> {
    if let Ok(a) = obj.cast::<PyArray1<f64>>() {
        let ro = a
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        if ro.as_slice().is_ok() {
            return Ok(Floats::Borrowed(ro));
        }
        return Ok(Floats::Owned(ro.as_array().iter().copied().collect()));
    }
    if let Ok(a) = obj.cast::<PyArray1<f32>>() {
        let ro = a
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        return Ok(Floats::Owned(
            ro.as_array().iter().map(|&x| x as f64).collect(),
        ));
    }
    let (arr, kind) = as_1d_array(obj, name)?;
    let size: usize = arr.getattr("size")?.extract()?;
    if !matches!(kind, 'f' | 'i' | 'u' | 'b') && size > 0 {
        return Err(PyValueError::new_err(format!(
            "{name} must hold real numbers, got dtype {}",
            dtype_text(&arr)?
        )));
    }
    // A fresh contiguous array: borrow it rather than copy it again.
    let converted = arr.call_method1("astype", ("float64",))?;
    Ok(Floats::Borrowed(
        converted.cast::<PyArray1<f64>>()?.readonly(),
    ))
}

/// Any 1-D integer array-like as int64 (`allow_bool` also accepts booleans as 0/1).
fn int_array<'py>(obj: &Bound<'py, PyAny>, name: &str, allow_bool: bool) -> PyResult<Ints<'py>> {
    if let Ok(a) = obj.cast::<PyArray1<i64>>() {
        let ro = a
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        if ro.as_slice().is_ok() {
            return Ok(Ints::Borrowed(ro));
        }
        return Ok(Ints::Owned(ro.as_array().iter().copied().collect()));
    }
    let (arr, kind) = as_1d_array(obj, name)?;
    let size: usize = arr.getattr("size")?.extract()?;
    if size == 0 {
        return Ok(Ints::Owned(Vec::new()));
    }
    let ok = matches!(kind, 'i' | 'u') || (allow_bool && kind == 'b');
    if !ok {
        return Err(PyValueError::new_err(format!(
            "{name} must be an integer array, got dtype {}",
            dtype_text(&arr)?
        )));
    }
    if kind == 'u' {
        let max: u64 = arr.call_method0("max")?.extract()?;
        if max > i64::MAX as u64 {
            return Err(PyValueError::new_err(format!(
                "{name} holds {max}, above the int64 range"
            )));
        }
    }
    let converted = arr.call_method1("astype", ("int64",))?;
    Ok(Ints::Borrowed(
        converted.cast::<PyArray1<i64>>()?.readonly(),
    ))
}

fn bool_array(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<bool>> {
    let (arr, kind) = as_1d_array(obj, name)?;
    let size: usize = arr.getattr("size")?.extract()?;
    if kind != 'b' && size > 0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a boolean mask, got dtype {}",
            dtype_text(&arr)?
        )));
    }
    let converted = arr.call_method1("astype", ("bool",))?;
    let a = converted.cast::<PyArray1<bool>>()?;
    Ok(a.readonly().as_array().iter().copied().collect())
}

/// Runs `f` with the GIL released when the input is large.
fn maybe_detach<T: Send>(py: Python<'_>, len: usize, f: impl FnOnce() -> T + Send) -> T {
    if len >= DETACH_MIN_LEN {
        py.detach(f)
    } else {
        f()
    }
}

/// Allocate `budget` rollouts over prompts with the given reward variances.
///
/// See the type stub (`_core.pyi`) for the full contract.
#[pyfunction]
#[pyo3(signature = (
    variances, budget, lo, hi, rule = "neyman", *,
    unseen = None, exploration_rollouts = None, pass_rates = None,
    mastery_threshold = None, priority_floor = None, skip_factor = None, min_rollouts = None,
    estimator = None, scale = None, skip_costs = None
))]
#[allow(clippy::too_many_arguments)]
fn allocate_rollouts<'py>(
    py: Python<'py>,
    variances: &Bound<'py, PyAny>,
    budget: i64,
    lo: i64,
    hi: i64,
    rule: &str,
    unseen: Option<&Bound<'py, PyAny>>,
    exploration_rollouts: Option<i64>,
    pass_rates: Option<&Bound<'py, PyAny>>,
    mastery_threshold: Option<f64>,
    priority_floor: Option<f64>,
    skip_factor: Option<f64>,
    min_rollouts: Option<i64>,
    estimator: Option<&str>,
    scale: Option<&Bound<'py, PyAny>>,
    skip_costs: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let rule = Rule::parse(rule).map_err(to_py_err)?;
    let estimator = Estimator::parse_optional(estimator).map_err(to_py_err)?;
    let v = float_array(variances, "variances")?;
    let scale = scale.map(|s| float_array(s, "scale")).transpose()?;
    let skip_costs = skip_costs
        .map(|s| float_array(s, "skip_costs"))
        .transpose()?;
    let unseen = unseen.map(|u| bool_array(u, "unseen")).transpose()?;
    let rates = pass_rates
        .map(|r| float_array(r, "pass_rates"))
        .transpose()?;
    let v = v.as_slice();
    let options = Options {
        unseen: unseen.as_deref(),
        exploration_rollouts,
        pass_rates: rates.as_ref().map(|r| r.as_slice()),
        mastery_threshold,
        priority_floor,
        skip_factor,
        min_rollouts,
        estimator,
        scale: scale.as_ref().map(|s| s.as_slice()),
        skip_costs: skip_costs.as_ref().map(|s| s.as_slice()),
    };
    let counts = maybe_detach(py, v.len(), || {
        allocate::allocate(v, budget, lo, hi, rule, &options)
    })
    .map_err(to_py_err)?;
    Ok(PyArray1::from_vec(py, counts))
}

/// Every problem of one allocation call's settings, as (subject, message) pairs (see the stub).
#[pyfunction]
#[pyo3(signature = (
    prompts, budget, lo, hi, rule = None, *,
    estimator = None, skip_factor = None, min_rollouts = None, exploration = None,
    mastery = None, exploration_rollouts = None, mastery_threshold = None, priority_floor = None,
    calibrated = None, noise_scale = None, filter_band = None, explore_seed = None,
    skip_price = None, prior = None, forget = None, run_policies = false
))]
#[allow(clippy::too_many_arguments)]
fn allocation_problems(
    prompts: usize,
    budget: i64,
    lo: i64,
    hi: i64,
    rule: Option<&str>,
    estimator: Option<&str>,
    skip_factor: Option<f64>,
    min_rollouts: Option<i64>,
    exploration: Option<bool>,
    mastery: Option<bool>,
    exploration_rollouts: Option<i64>,
    mastery_threshold: Option<f64>,
    priority_floor: Option<f64>,
    calibrated: Option<bool>,
    noise_scale: Option<bool>,
    filter_band: Option<f64>,
    explore_seed: Option<u64>,
    skip_price: Option<f64>,
    prior: Option<(f64, f64)>,
    forget: Option<f64>,
    run_policies: bool,
) -> PyResult<Vec<(&'static str, String)>> {
    let settings = rules::Settings {
        prompts,
        budget,
        lo,
        hi,
        rule: rule.map(Rule::parse).transpose().map_err(to_py_err)?,
        estimator: Estimator::parse_optional(estimator).map_err(to_py_err)?,
        skip_factor,
        min_rollouts,
        exploration,
        mastery,
        exploration_rollouts,
        mastery_threshold,
        priority_floor,
        calibrated,
        noise_scale,
        filter_band,
        explore_seed,
        skip_price,
        prior,
        forget,
        run_policies,
    };
    Ok(rules::problems(&settings)
        .into_iter()
        .map(|p| (p.subject.name(), p.message))
        .collect())
}

/// Rule "filter"'s counts (see the type stub).
#[pyfunction]
#[pyo3(signature = (means, variances, budget, lo, hi, band))]
fn filter_counts<'py>(
    py: Python<'py>,
    means: &Bound<'py, PyAny>,
    variances: &Bound<'py, PyAny>,
    budget: i64,
    lo: i64,
    hi: i64,
    band: f64,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let (m, v) = (
        float_array(means, "means")?,
        float_array(variances, "variances")?,
    );
    let counts = crate::filter::filter_counts(m.as_slice(), v.as_slice(), budget, lo, hi, band)
        .map_err(to_py_err)?;
    Ok(PyArray1::from_vec(py, counts))
}

/// group_norm's per-prompt cost at given counts (see the type stub).
#[pyfunction]
#[pyo3(signature = (alpha, beta, weights, counts))]
fn group_norm_costs<'py>(
    py: Python<'py>,
    alpha: &Bound<'py, PyAny>,
    beta: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let (a, b) = (float_array(alpha, "alpha")?, float_array(beta, "beta")?);
    let w = float_array(weights, "weights")?;
    let n = int_array(counts, "counts", false)?;
    let out =
        crate::estimator::group_norm_costs(a.as_slice(), b.as_slice(), w.as_slice(), n.as_slice())
            .map_err(to_py_err)?;
    Ok(PyArray1::from_vec(py, out))
}

/// Beta posteriors of per-prompt pass rates, keyed by int64 prompt id.
#[pyclass(name = "PassRatePool", module = "dynamo_openrlhf._core")]
struct PyPassRatePool {
    inner: PassRatePool,
}

impl PyPassRatePool {
    /// One float64 per id from a pool query (GIL released for large batches).
    fn per_id<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
        query: impl Fn(&PassRatePool, &[i64]) -> Vec<f64> + Send + Sync,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let ids = int_array(prompt_ids, "prompt_ids", false)?;
        let ids = ids.as_slice();
        let pool = &self.inner;
        Ok(PyArray1::from_vec(
            py,
            maybe_detach(py, ids.len(), || query(pool, ids)),
        ))
    }
}

#[pymethods]
impl PyPassRatePool {
    #[new]
    #[pyo3(
        signature = (prior = (1.0, 1.0), forget = 1.0, capacity = None, *, noise_weight = 1.0),
        text_signature = "(prior=(1.0, 1.0), forget=1.0, capacity=None, *, noise_weight=1.0)"
    )]
    fn new(
        prior: (f64, f64),
        forget: f64,
        capacity: Option<usize>,
        noise_weight: f64,
    ) -> PyResult<Self> {
        let mut inner = PassRatePool::new(prior.0, prior.1, forget, capacity.unwrap_or(0))
            .map_err(to_py_err)?;
        inner.set_noise_weight(noise_weight).map_err(to_py_err)?;
        Ok(PyPassRatePool { inner })
    }

    /// Record one training step: forget (× forget), then add (successes, trials) per id and,
    /// optionally, the per-row noise sums of the successful and the failed rollouts.
    #[pyo3(signature = (prompt_ids, successes, trials, *, noise_success = None, noise_failure = None))]
    fn update(
        &mut self,
        py: Python<'_>,
        prompt_ids: &Bound<'_, PyAny>,
        successes: &Bound<'_, PyAny>,
        trials: &Bound<'_, PyAny>,
        noise_success: Option<&Bound<'_, PyAny>>,
        noise_failure: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let ids = int_array(prompt_ids, "prompt_ids", false)?;
        let succ = int_array(successes, "successes", true)?;
        let tri = int_array(trials, "trials", true)?;
        let qs = noise_success
            .map(|x| float_array(x, "noise_success"))
            .transpose()?;
        let qf = noise_failure
            .map(|x| float_array(x, "noise_failure"))
            .transpose()?;
        let noise = NoiseRows::pair(
            qs.as_ref().map(|x| x.as_slice()),
            qf.as_ref().map(|x| x.as_slice()),
        )
        .map_err(to_py_err)?;
        let (ids, succ, tri) = (ids.as_slice(), succ.as_slice(), tri.as_slice());
        let pool = &mut self.inner;
        maybe_detach(py, ids.len(), || {
            pool.update_with_noise(ids, succ, tri, noise)
        })
        .map_err(to_py_err)
    }

    /// Per-prompt noise scale (see the type stub), float64.
    fn noise_scale<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        self.per_id(py, prompt_ids, PassRatePool::noise_scale)
    }

    /// (success, failure) forgotten noise sums per id.
    fn noise_sums<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
    ) -> PyResult<(Float64Array<'py>, Float64Array<'py>)> {
        let ids = int_array(prompt_ids, "prompt_ids", false)?;
        let ids = ids.as_slice();
        let pool = &self.inner;
        let (s, f) = maybe_detach(py, ids.len(), || pool.noise_sums(ids));
        Ok((PyArray1::from_vec(py, s), PyArray1::from_vec(py, f)))
    }

    #[getter]
    fn get_noise_means(&self) -> (Option<f64>, Option<f64>) {
        let [s, f] = self.inner.noise_means();
        (s, f)
    }

    #[getter]
    fn get_noise_weight(&self) -> f64 {
        self.inner.noise_weight()
    }

    #[setter]
    fn set_noise_weight(&mut self, weight: f64) -> PyResult<()> {
        self.inner.set_noise_weight(weight).map_err(to_py_err)
    }

    /// Posterior mean pass rate per id (prior mean for unseen ids), float64.
    fn mean<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        self.per_id(py, prompt_ids, PassRatePool::mean)
    }

    /// Posterior expected Bernoulli variance E[p(1-p)] per id, float64.
    fn expected_variance<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        self.per_id(py, prompt_ids, PassRatePool::expected_variance)
    }

    /// Revisit-calibrated expected variance per id, float64.
    fn calibrated_variance<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        self.per_id(py, prompt_ids, PassRatePool::calibrated_variance)
    }

    /// Priced-skip costs per id (see the type stub).
    #[pyo3(signature = (prompt_ids, price, *, calibrated = false, explore_seed = None))]
    fn skip_costs<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
        price: f64,
        calibrated: bool,
        explore_seed: Option<u64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let ids = int_array(prompt_ids, "prompt_ids", false)?;
        let ids = ids.as_slice();
        let pool = &self.inner;
        let costs = maybe_detach(py, ids.len(), || {
            pool.skip_costs(ids, price, calibrated, explore_seed)
        })
        .map_err(to_py_err)?;
        Ok(PyArray1::from_vec(py, costs))
    }

    /// (successes, failures) evidence above the prior per id, after forgetting.
    fn evidence<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
    ) -> PyResult<(Float64Array<'py>, Float64Array<'py>)> {
        let ids = int_array(prompt_ids, "prompt_ids", false)?;
        let ids = ids.as_slice();
        let pool = &self.inner;
        let (s, f) = maybe_detach(py, ids.len(), || pool.evidence(ids));
        Ok((PyArray1::from_vec(py, s), PyArray1::from_vec(py, f)))
    }

    /// Allocate `budget` rollouts over the batch from the posterior expected variances.
    #[pyo3(signature = (
        prompt_ids, budget, lo, hi, rule = "neyman", *,
        exploration = None, mastery = None, exploration_rollouts = None,
        mastery_threshold = None, priority_floor = None, skip_factor = None, min_rollouts = None,
        calibrated = None, estimator = None, explore_seed = None, scale = None, noise_scale = None,
        skip_price = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn allocate<'py>(
        &self,
        py: Python<'py>,
        prompt_ids: &Bound<'py, PyAny>,
        budget: i64,
        lo: i64,
        hi: i64,
        rule: &str,
        exploration: Option<bool>,
        mastery: Option<bool>,
        exploration_rollouts: Option<i64>,
        mastery_threshold: Option<f64>,
        priority_floor: Option<f64>,
        skip_factor: Option<f64>,
        min_rollouts: Option<i64>,
        calibrated: Option<bool>,
        estimator: Option<&str>,
        explore_seed: Option<u64>,
        scale: Option<&Bound<'py, PyAny>>,
        noise_scale: Option<bool>,
        skip_price: Option<f64>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let rule = Rule::parse(rule).map_err(to_py_err)?;
        let estimator = Estimator::parse_optional(estimator).map_err(to_py_err)?;
        let ids = int_array(prompt_ids, "prompt_ids", false)?;
        let ids = ids.as_slice();
        let scale = scale.map(|s| float_array(s, "scale")).transpose()?;
        let options = PoolAllocateOptions {
            exploration,
            mastery,
            exploration_rollouts,
            mastery_threshold,
            priority_floor,
            skip_factor,
            min_rollouts,
            calibrated,
            estimator,
            explore_seed,
            scale: scale.as_ref().map(|s| s.as_slice()),
            noise_scale,
            skip_price,
        };
        let pool = &self.inner;
        let counts = maybe_detach(py, ids.len(), || {
            pool.allocate(ids, budget, lo, hi, rule, &options)
        })
        .map_err(to_py_err)?;
        Ok(PyArray1::from_vec(py, counts))
    }

    /// Empirical-Bayes (method of moments) fit of the prior; sets and returns (alpha0, beta0).
    fn fit_prior(&mut self, py: Python<'_>) -> PyResult<(f64, f64)> {
        let pool = &mut self.inner;
        let len = pool.len();
        maybe_detach(py, len, || pool.fit_prior()).map_err(to_py_err)
    }

    #[getter]
    fn get_prior(&self) -> (f64, f64) {
        self.inner.prior()
    }

    #[setter]
    fn set_prior(&mut self, prior: (f64, f64)) -> PyResult<()> {
        self.inner.set_prior(prior.0, prior.1).map_err(to_py_err)
    }

    #[getter]
    fn get_forget(&self) -> f64 {
        self.inner.forget()
    }

    #[setter]
    fn set_forget(&mut self, forget: f64) -> PyResult<()> {
        self.inner.set_forget(forget).map_err(to_py_err)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, prompt_id: &Bound<'_, PyAny>) -> bool {
        prompt_id
            .extract::<i64>()
            .is_ok_and(|id| self.inner.contains(id))
    }

    /// All ids in the pool (storage order).
    fn ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_vec(py, self.inner.ids())
    }

    /// Size, memory and evidence totals.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("prompts", s.prompts)?;
        d.set_item("slots", s.slots)?;
        d.set_item("load_factor", s.prompts as f64 / s.slots as f64)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("bytes_per_prompt", s.bytes as f64 / s.prompts.max(1) as f64)?;
        d.set_item("updates", s.updates)?;
        d.set_item("scale", s.scale)?;
        d.set_item("prior", self.inner.prior())?;
        d.set_item("forget", self.inner.forget())?;
        d.set_item("successes", s.successes)?;
        d.set_item("failures", s.failures)?;
        d.set_item("noise_success_mean", s.noise_means[0])?;
        d.set_item("noise_failure_mean", s.noise_means[1])?;
        d.set_item("noise_weight", self.inner.noise_weight())?;
        Ok(d)
    }

    /// Write the pool atomically (temporary file, fsync, rename, fsync of the directory).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let pool = &self.inner;
        py.detach(|| storage::save(pool, &path)).map_err(to_py_err)
    }

    /// Read a pool written by `save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| storage::load(&path)).map_err(to_py_err)?;
        Ok(PyPassRatePool { inner })
    }

    /// The file format of `save` as bytes, written straight into the `bytes` object (no
    /// intermediate buffer, so a save holds the pool's bytes once).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let pool = &self.inner;
        let len = storage::file_len(pool.len() as u64) as usize;
        PyBytes::new_with(py, len, |buf: &mut [u8]| {
            maybe_detach(py, pool.len(), || storage::write_into(pool, buf)).map_err(to_py_err)
        })
    }

    /// Inverse of `to_bytes`.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        let inner = maybe_detach(py, data.len() / storage::RECORD_LEN, || {
            storage::from_bytes(data)
        })
        .map_err(to_py_err)?;
        Ok(PyPassRatePool { inner })
    }

    /// Pickling (e.g. to ship a pool to a Ray actor) goes through the file format.
    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let from_bytes = py.get_type::<PyPassRatePool>().getattr("from_bytes")?;
        let args = PyTuple::new(py, [self.to_bytes(py)?])?;
        Ok((from_bytes, args))
    }

    fn __repr__(&self) -> String {
        let (a, b) = self.inner.prior();
        format!(
            "PassRatePool(prompts={}, prior=({a:?}, {b:?}), forget={:?})",
            self.inner.len(),
            self.inner.forget()
        )
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("RULES", PyTuple::new(m.py(), Rule::NAMES)?)?;
    m.add("ESTIMATORS", PyTuple::new(m.py(), Estimator::NAMES)?)?;
    m.add("FORMAT_VERSION", storage::VERSION)?;
    m.add_function(wrap_pyfunction!(allocate_rollouts, m)?)?;
    m.add_function(wrap_pyfunction!(group_norm_costs, m)?)?;
    m.add_function(wrap_pyfunction!(allocation_problems, m)?)?;
    m.add_function(wrap_pyfunction!(filter_counts, m)?)?;
    m.add(
        "PROBLEM_SUBJECTS",
        PyTuple::new(m.py(), rules::Subject::NAMES)?,
    )?;
    m.add_class::<PyPassRatePool>()?;
    Ok(())
}
