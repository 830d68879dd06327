//! The one way benchmarks time things: untimed warm-up runs, then timed repeats, reported by
//! their median (robust to the odd slow run on a shared machine).

use std::time::Instant;

/// Each timed run's wall time (ms, in order) and its result.
pub struct Timed<T> {
    pub ms: Vec<f64>,
    pub results: Vec<T>,
}

impl<T> Timed<T> {
    pub fn median_ms(&self) -> f64 {
        median(&self.ms)
    }
}

/// Calls `f(0), f(1), …`: the first `warmup` calls untimed, the next `repeats` timed.
/// Every error ends the measurement.
pub fn time_runs<T, E>(warmup: usize, repeats: usize, mut f: impl FnMut(usize) -> Result<T, E>) -> Result<Timed<T>, E> {
    for i in 0..warmup {
        f(i)?;
    }
    let mut timed = Timed { ms: Vec::with_capacity(repeats), results: Vec::with_capacity(repeats) };
    for i in warmup..warmup + repeats {
        let start = Instant::now();
        let out = f(i)?;
        timed.ms.push(start.elapsed().as_secs_f64() * 1e3);
        timed.results.push(out);
    }
    Ok(timed)
}

/// The median (the upper one of an even count); NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// [`time_runs`] for infallible work.
pub fn time_infallible<T>(warmup: usize, repeats: usize, mut f: impl FnMut(usize) -> T) -> Timed<T> {
    match time_runs::<T, std::convert::Infallible>(warmup, repeats, |i| Ok(f(i))) {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_runs_are_not_timed_and_the_median_is_robust() {
        let mut calls = Vec::new();
        let t = time_infallible(2, 3, |i| {
            calls.push(i);
            i * 10
        });
        assert_eq!(calls, vec![0, 1, 2, 3, 4]);
        assert_eq!(t.results, vec![20, 30, 40]);
        assert_eq!(t.ms.len(), 3);
        assert_eq!(median(&[5.0, 1.0, 1000.0]), 5.0);
        assert_eq!(median(&[2.0, 1.0]), 2.0);
        assert!(median(&[]).is_nan());
        let failed = time_runs(1, 2, |i| if i == 1 { Err("boom") } else { Ok(i) });
        assert_eq!(failed.err(), Some("boom"));
    }
}
