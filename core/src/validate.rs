//! Checks of numeric command-line values, shared by every binary so that a bad flag gets the same
//! one-line message everywhere (`--threads must be ≥ 1 (got 0)`), before any work starts.

use crate::CoreError;

fn bad(flag: &str, rule: &str, got: impl std::fmt::Display) -> CoreError {
    CoreError::Invalid(format!("{flag} must be {rule} (got {got})"))
}

/// `v ≥ min`.
pub fn at_least(flag: &str, v: usize, min: usize) -> Result<(), CoreError> {
    if v < min {
        return Err(bad(flag, &format!("≥ {min}"), v));
    }
    Ok(())
}

/// `v` finite and `> 0`.
pub fn positive(flag: &str, v: f64) -> Result<(), CoreError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(bad(flag, "a finite number > 0", v));
    }
    Ok(())
}

/// `v` finite and `≥ 0`.
pub fn non_negative(flag: &str, v: f64) -> Result<(), CoreError> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(bad(flag, "a finite number ≥ 0", v));
    }
    Ok(())
}

/// `lo ≤ v < hi` (and finite).
pub fn in_range(flag: &str, v: f64, lo: f64, hi: f64) -> Result<(), CoreError> {
    if !(v.is_finite() && v >= lo && v < hi) {
        return Err(bad(flag, &format!("in [{lo}, {hi})"), v));
    }
    Ok(())
}

/// Largest number of seconds [`seconds`] accepts: far beyond any deadline, and always a valid `Duration`.
pub const MAX_SECONDS: f64 = 1e6;

/// A duration flag: finite, `> 0` and at most [`MAX_SECONDS`] (`Duration::from_secs_f64` panics on
/// infinite or absurd values).
pub fn seconds(flag: &str, v: f64) -> Result<(), CoreError> {
    if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
        return Err(bad(flag, &format!("a number of seconds in (0, {MAX_SECONDS:e}]"), v));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_flag_and_value() {
        assert_eq!(at_least("--threads", 0, 1).unwrap_err().to_string(), "invalid argument: --threads must be ≥ 1 (got 0)");
        assert!(at_least("--threads", 1, 1).is_ok());
        assert!(positive("--lr", f64::NAN).unwrap_err().to_string().contains("--lr must be a finite number > 0 (got NaN)"));
        assert!(positive("--lr", 0.0).is_err() && positive("--lr", 1e-4).is_ok());
        assert!(non_negative("--kl-weight", -1.0).is_err() && non_negative("--kl-weight", 0.0).is_ok());
        assert!(in_range("--ema-decay", 1.0, 0.0, 1.0).is_err() && in_range("--ema-decay", 0.999, 0.0, 1.0).is_ok());
        assert!(in_range("--ema-decay", f64::INFINITY, 0.0, 1.0).is_err());
        assert_eq!(
            seconds("--timeout-s", 1e20).unwrap_err().to_string(),
            "invalid argument: --timeout-s must be a number of seconds in (0, 1e6] (got 100000000000000000000)"
        );
        assert!(seconds("--timeout-s", f64::INFINITY).is_err() && seconds("--timeout-s", 0.0).is_err());
        assert!(seconds("--timeout-s", 1e6).is_ok() && seconds("--timeout-s", 0.5).is_ok());
    }
}
